"""Path safety: no URL makes the server open (or even look up as a slide) a file outside the slides root.

Hypothesis builds URL paths from traversal pieces (``..``, percent- and
double-encoded separators and dots, absolute paths, backslashes, NUL bytes,
overlong names, symlinks leading out, symlink loops) and sends them through
Flask's test client to every endpoint.  The ``TileService``'s opener and format
detector record every path they are given: each must lie inside the root, the
slide outside (a real, readable slide) must never be touched, and any 200 must
come from a slide that really is inside.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote_to_bytes

import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import FIXTURES
from tileserver.errors import SlideNotFound
from tileserver.server import create_app
from tileserver.slides import SlideReader, detect_format, open_slide
from tileserver.tiles import TileService

from ..server.conftest import make_settings
from .conftest import record

pytestmark = [pytest.mark.shared_data]

SMALL = FIXTURES / "small.svs"
EXAMPLES = 300
SENTINEL = b"SENTINEL-0c9f1e-not-for-clients"


@dataclass
class Tree:
    """A slides root with good slides and ways out, plus a secret slide next to it."""

    base: Path
    root: Path
    secret: Path
    opened: list[Path] = field(default_factory=list)
    detected: list[Path] = field(default_factory=list)
    requests: int = 0
    statuses: dict[int, int] = field(default_factory=dict)

    @property
    def inside(self) -> set[Path]:
        return {(self.root / "slide.svs").resolve(), (self.root / "sub" / "deep.svs").resolve()}


def _build_tree(base: Path) -> Tree:
    root, outside = base / "slides", base / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    shutil.copy(SMALL, root / "slide.svs")
    shutil.copy(SMALL, root / "sub" / "deep.svs")
    secret = outside / "secret.svs"
    shutil.copy(SMALL, secret)
    (outside / "secret.txt").write_bytes(SENTINEL)  # must never appear in any answer
    shutil.copy(SMALL, base / "slides-sibling.svs")  # a prefix of the root's name: /../slides-sibling.svs
    (root / "escape.svs").symlink_to(secret)
    (root / "escape-dir").symlink_to(outside, target_is_directory=True)
    (root / "sub" / "up.svs").symlink_to(Path("..") / ".." / "outside" / "secret.svs")
    (root / "loop.svs").symlink_to(root / "loop.svs")  # a symlink loop
    (root / "abs").symlink_to("/")
    return Tree(base, root, secret)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tree]:
    t = _build_tree(tmp_path_factory.mktemp("paths"))
    yield t
    record(
        "path_safety",
        {
            "requests": t.requests,
            "statuses": {str(k): v for k, v in sorted(t.statuses.items())},
            "files_opened": len(t.opened),
            "files_opened_outside_root": sum(not p.resolve().is_relative_to(t.root.resolve()) for p in t.opened),
        },
    )


@pytest.fixture(scope="module")
def app(tree: Tree) -> Iterator[Flask]:
    def opener(path: Path) -> SlideReader:
        tree.opened.append(Path(path))
        return open_slide(path)

    def detector(path: Path) -> str | None:
        tree.detected.append(Path(path))
        return detect_format(path)

    svc = TileService(make_settings(tree.root), opener=opener, detector=detector)
    a = create_app(svc.settings, service=svc)
    a.config["TESTING"] = True
    yield a
    svc.close()


@pytest.fixture(scope="module")
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def _check_recorded(tree: Tree) -> None:
    root = tree.root.resolve()
    for p in tree.opened + tree.detected:
        real = p.resolve()
        assert real.is_relative_to(root), f"{p} (really {real}) is outside the slides root"
        assert real != tree.secret.resolve()
    # the opener sees only the real slides inside (or a folder inside: DICOM slides are folders)
    assert all(p.resolve() in tree.inside or p.is_dir() for p in tree.opened)


# -- pieces of hostile paths -------------------------------------------------------------------

SEGMENTS = [
    "..",
    ".",
    "",
    "%2e%2e",
    "%2E%2E",
    "%252e%252e",
    ".%2e",
    "%2e.",
    "..%2f..",
    "..%2F",
    "%2f",
    "%252f",
    "%5c",
    "..%5c..",
    "\\",
    "..\\..",
    "%00",
    "slide.svs%00",
    "slide.svs%00.dzi",
    "%c0%ae%c0%ae",  # overlong UTF-8 dots
    "%e2%80%a8",
    "outside",
    "secret.svs",
    "secret.txt",
    "slides-sibling.svs",
    "escape.svs",
    "escape-dir",
    "up.svs",
    "loop.svs",
    "abs",
    "etc",
    "passwd",
    "sub",
    "deep.svs",
    "slide.svs",
    "~",
    "a" * 300,
    "b" * 5000,
    "%",
    "%zz",
    "/etc/passwd",
    "//",
    "C:",
    "file:",
]

SUFFIXES = [
    ".dzi",
    "_files/0/0_0.jpeg",
    "_files/8/0_0.png",
    "/properties.json",
    "/thumbnail.jpeg",
    "/thumbnail.jpeg?size=64",
    "/associated/thumbnail.jpeg",
    "/associated/..%2f..%2foutside%2fsecret.svs.jpeg",
    "",
]

PREFIXES = ["/", "/view/", "//", "/%2e%2e/", "/./", "/static/", "/static/..%2f..%2f"]


@st.composite
def hostile_urls(draw: st.DrawFn) -> str:
    segments = draw(st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=6))
    sep = draw(st.sampled_from(["/", "/", "%2f", "\\", "%5c", "//"]))
    return draw(st.sampled_from(PREFIXES)) + sep.join(segments) + draw(st.sampled_from(SUFFIXES))


def _get(client: FlaskClient, tree: Tree, url: str) -> int:
    # PATH_INFO as a WSGI server (gunicorn) builds it: percent-decoded bytes as latin-1.  Set
    # directly, because the test client would parse a path starting "//" as a host name.
    path, _, query = url.partition("?")
    environ = {"PATH_INFO": unquote_to_bytes(path).decode("latin-1"), "QUERY_STRING": query, "RAW_URI": url}
    resp = client.get("/", environ_overrides=environ)
    status = resp.status_code
    assert SENTINEL not in resp.get_data(), url
    tree.requests += 1
    tree.statuses[status] = tree.statuses.get(status, 0) + 1
    return status


def test_legitimate_slides_are_served(client: FlaskClient, tree: Tree) -> None:
    for url in ("/slide.svs.dzi", "/sub/deep.svs/properties.json", "/sub/deep.svs_files/0/0_0.jpeg"):
        assert _get(client, tree, url) == 200, url
    listed = sorted(s["path"] for s in client.get("/slides.json").get_json())
    assert listed == ["slide.svs", "sub/deep.svs"]
    _check_recorded(tree)


@pytest.mark.parametrize(
    "url",
    [
        "/escape.svs.dzi",
        "/escape-dir/secret.svs.dzi",
        "/sub/up.svs/properties.json",
        "/loop.svs.dzi",
        "/abs/etc/passwd/properties.json",
        "/../slides-sibling.svs.dzi",
        "/%2e%2e/slides-sibling.svs.dzi",
        "/%2e%2e%2fslides-sibling.svs.dzi",
        "/%252e%252e%252fslides-sibling.svs.dzi",
        "/sub/..%2f..%2foutside/secret.svs.dzi",
        "/sub%5c..%5c..%5coutside%5csecret.svs.dzi",
        "/slide.svs%00.dzi",
        "/" + quote(str(SMALL)) + ".dzi",
        "//" + str(SMALL).lstrip("/") + ".dzi",
        "/view/..%2foutside%2fsecret.svs",
        "/static/..%2f..%2f..%2f..%2f..%2f..%2f..%2f..%2f" + quote(str(SMALL.parent.parent)) + "%2fsecret.txt",
        "/escape-dir/secret.txt",
        "/" + "a" * 5000 + ".dzi",
        "/" + "/".join(["x"] * 2000) + ".dzi",
    ],
)
def test_ways_out_are_404(client: FlaskClient, tree: Tree, url: str) -> None:
    assert _get(client, tree, url) == 404
    _check_recorded(tree)


def test_listing_with_a_symlink_loop(client: FlaskClient, tree: Tree) -> None:
    # a symlink loop in the folder must not break the index (it is simply not a slide)
    assert _get(client, tree, "/") == 200
    assert _get(client, tree, "/slides.json") == 200
    _check_recorded(tree)


@settings(
    max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(url=hostile_urls())
def test_hostile_urls_never_leave_the_root(client: FlaskClient, tree: Tree, url: str) -> None:
    status = _get(client, tree, url)
    assert status in (200, 304, 308, 400, 404, 405), (url, status)
    _check_recorded(tree)


@settings(max_examples=EXAMPLES, deadline=None, database=None)
@given(rel=st.text(st.characters(codec="utf-8"), max_size=60) | st.lists(st.sampled_from(SEGMENTS)).map("/".join))
def test_resolve_stays_inside_or_refuses(rel: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    # resolve() directly, with arbitrary text: inside the root, or SlideNotFound, nothing else
    global _RESOLVE_TREE
    if _RESOLVE_TREE is None:
        _RESOLVE_TREE = _build_tree(tmp_path_factory.mktemp("resolve"))
    t = _RESOLVE_TREE
    svc = TileService(make_settings(t.root), opener=lambda p: pytest.fail(f"opened {p}"))
    try:
        path = svc.resolve(rel)
    except SlideNotFound:
        return
    assert path.is_relative_to(t.root.resolve()) and path != t.root.resolve()
    assert path.resolve() != t.secret.resolve()


_RESOLVE_TREE: Tree | None = None
