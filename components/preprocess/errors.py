"""The preprocess stage's own failure: what it cannot turn into a correct result, named in the message."""


class PreprocessError(RuntimeError):
    pass
