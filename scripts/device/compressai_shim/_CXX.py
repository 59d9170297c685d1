"""Stand-in for CompressAI's compiled ``_CXX`` on a machine without a build of it (a borrowed GPU
machine's Python 3.12, which cannot reach a package index).  CompressAI calls it when it updates
its CDF tables, which training does before each held-out evaluation; evaluation reads likelihoods,
not tables, so any valid table serves.  Export, whose tables are shipped, runs on the development
machine with the real CompressAI.  Our own simple quantization, not CompressAI's algorithm."""


def pmf_to_quantized_cdf(pmf, precision):
    """A CDF of ``2**precision`` total in which every symbol keeps a frequency of at least 1."""
    total = 1 << precision
    freqs = [max(1, round(max(float(p), 0.0) * total)) for p in pmf]
    diff = total - sum(freqs)
    while diff:
        i = max(range(len(freqs)), key=freqs.__getitem__)
        step = diff if diff > 0 else max(diff, 1 - freqs[i])
        if step == 0:
            raise ValueError("more symbols than the precision can code")
        freqs[i] += step
        diff -= step
    cdf = [0]
    for f in freqs:
        cdf.append(cdf[-1] + f)
    return cdf
