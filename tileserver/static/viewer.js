/* tileserver viewer: OpenSeadragon over the slide's .dzi, a scale bar from mpp, and the properties panel.
 * State for tests and tools lives in window.tileserverState:
 *   {opened, openFailed, fullyLoaded, failedTiles: [url, ...], loadedTiles}
 */
(function () {
  "use strict";
  const info = window.TILESERVER_SLIDE;
  const state = { opened: false, openFailed: null, fullyLoaded: false, failedTiles: [], loadedTiles: 0 };
  window.tileserverState = state;

  if (typeof OpenSeadragon === "undefined") {
    document.getElementById("vendor-missing").hidden = false;
    state.openFailed = "OpenSeadragon not installed";
    return;
  }

  const viewerEl = document.getElementById("viewer");
  if (info.glass_color) {
    // dropped glass and DisplayRects leave gaps: paint them in the slide's own glass colour
    viewerEl.style.background = "rgb(" + info.glass_color.join(",") + ")";
  }

  const viewer = OpenSeadragon({
    id: "viewer",
    prefixUrl: "/static/vendor/openseadragon/images/",
    tileSources: info.dzi,
    showNavigator: true,
    navigatorPosition: "TOP_RIGHT",
    maxZoomPixelRatio: 2,
    visibilityRatio: 1,
    constrainDuringPan: true,
    immediateRender: false,
    timeout: 60000,
  });
  window.tileserverViewer = viewer;

  viewer.addHandler("open", function () {
    state.opened = true;
    const item = viewer.world.getItemAt(0);
    item.addHandler("fully-loaded-change", function (e) {
      state.fullyLoaded = e.fullyLoaded;
    });
    state.fullyLoaded = item.getFullyLoaded();
    updateScaleBar();
  });
  viewer.addHandler("open-failed", function (e) {
    state.openFailed = e.message || "open failed";
  });
  viewer.addHandler("tile-loaded", function () {
    state.loadedTiles += 1;
  });
  viewer.addHandler("tile-load-failed", function (e) {
    const url = e.tile && e.tile.getUrl ? e.tile.getUrl() : String(e.message);
    state.failedTiles.push(url);
  });

  // ---- scale bar: microns per screen pixel from mpp and the current zoom ----
  const bar = document.getElementById("scalebar");
  const line = bar.querySelector(".bar-line");
  const label = bar.querySelector(".bar-label");
  const TARGET_PX = 120;

  function niceLength(um) {
    const pow = Math.pow(10, Math.floor(Math.log10(um)));
    let best = pow;
    for (const m of [1, 2, 5, 10]) {
      if (m * pow <= um) best = m * pow;
    }
    return best;
  }

  function updateScaleBar() {
    if (!info.mpp || !viewer.world.getItemCount()) return;
    const screenPerImage = viewer.viewport.viewportToImageZoom(viewer.viewport.getZoom(true));
    const umPerScreenPx = info.mpp[0] / screenPerImage;
    const um = niceLength(TARGET_PX * umPerScreenPx);
    line.style.width = Math.round(um / umPerScreenPx) + "px";
    label.textContent = um >= 1000 ? um / 1000 + " mm" : um >= 1 ? um + " µm" : um.toPrecision(1) + " µm";
    bar.hidden = false;
  }
  viewer.addHandler("animation", updateScaleBar);
  viewer.addHandler("resize", updateScaleBar);

  // ---- properties panel ----
  const tbody = document.querySelector("#properties tbody");
  const filter = document.getElementById("prop-filter");
  fetch(info.url + "/properties.json")
    .then(function (r) { return r.json(); })
    .then(function (props) {
      Object.keys(props).sort().forEach(function (key) {
        const tr = document.createElement("tr");
        const k = document.createElement("th");
        const v = document.createElement("td");
        k.textContent = key;
        v.textContent = props[key];
        tr.append(k, v);
        tbody.append(tr);
      });
    });
  filter.addEventListener("input", function () {
    const q = filter.value.toLowerCase();
    tbody.querySelectorAll("tr").forEach(function (tr) {
      tr.hidden = q && !tr.textContent.toLowerCase().includes(q);
    });
  });
})();
