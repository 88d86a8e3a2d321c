"""lmgen: the tokenization design space of autoregressive image generation.

One shared Llama (``lmgen.llama``) is trained on images written by different tokenizers
(``lmgen.tokenizers.TOKENIZERS``); ``lmgen run`` (``lmgen.experiment``) runs one point.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lmgen")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0+unknown"
