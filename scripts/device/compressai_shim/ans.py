"""Stand-in for CompressAI's compiled rANS coder where no build of it exists: constructible (every
CompressAI entropy model makes one), unusable.  Training codes nothing, and tileserver decodes with
its own coder (tileserver/codecs/rans.py); encoding needs the real CompressAI."""


class _Missing:
    def __getattr__(self, name):
        raise RuntimeError("compressai.ans is not built for this Python: encode on the development machine")


class RansEncoder(_Missing):
    pass


class BufferedRansEncoder(_Missing):
    pass


class RansDecoder(_Missing):
    pass
