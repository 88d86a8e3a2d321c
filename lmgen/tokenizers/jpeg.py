"""JPEG bytes as tokens: JPEG-LM's recipe (Han et al. 2024, arXiv 2408.08459) via Pillow.

An image is saved with Pillow's JPEG encoder and every byte of the file is one token
(vocab 256); the LM sees no vision-specific structure. JPEG-LM's settings are the defaults:

- ``quality=25, subsampling="4:2:0"``: ~5K bytes for a 256×256 image.
- ``streamtype=2`` (abbreviated stream): the quantisation (DQT) and Huffman (DHT) tables are
  identical for every image at a given quality/subsampling, so they are left out of the
  tokens, kept once (a ``streamtype=1`` tables-only stream) and spliced back after SOI on
  decode. They travel in ``state_dict`` so a token cache decodes with the very tables that
  wrote it, whatever libjpeg build is installed later.
- ``restart_marker_blocks=1``: an RST marker after every MCU; JPEG-LM keeps them because
  they resynchronise the entropy coder at every 16×16 patch (4:2:0), which helps the LM
  and lets a prompt be cut at a patch boundary.

``bpe_vocab`` > 0 extends the 256 byte values with a byte-level BPE learned on the train
streams in ``fit`` (JPEG-LM: 320 tokens; see ``bpe.py``): ids are then BPE tokens, which
never lengthen a stream, so ``max_tokens`` stays the byte bound.

Pillow ignores save options it does not know, so the constructor checks that the
installed Pillow really writes the restart interval (DRI) and abbreviated streams.

Generated streams are untrusted: ``decode`` checks the header (SOI, every SOF declaring
exactly H×W, a scan, an EOI) in Python before Pillow sees the bytes, so a stream claiming
65535×65535 costs nothing, and any Pillow/libjpeg error marks the item ``valid=False``.
"""

from __future__ import annotations

import io
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .base import Decoded, TokenBatch, grey_images, kept_rows, pad_token_lists
from .bpe import ByteBPE

log = logging.getLogger(__name__)

SUBSAMPLINGS = ("4:4:4", "4:2:2", "4:2:0")
SOI, EOI = b"\xff\xd8", b"\xff\xd9"
# Start-of-frame markers (baseline, extended, progressive, lossless, hierarchical,
# arithmetic); 0xC4 (DHT), 0xC8 (JPG) and 0xCC (DAC) share the range but are not frames.
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_SOS, _DRI = 0xDA, 0xDD
# Safety margin on the noise-image length when max_tokens is derived (see _derive_max_tokens).
_MAX_TOKENS_MARGIN = 1.1


@dataclass
class JpegConfig:
    """Configuration of the JPEG-bytes tokenizer. Defaults are JPEG-LM's."""

    name: str = "jpeg"
    quality: int = 25                 # JPEG-LM: 25
    subsampling: str = "4:2:0"        # one of 4:4:4, 4:2:2, 4:2:0; JPEG-LM: 4:2:0
    restart_markers: bool = True      # RST after every MCU (Pillow restart_marker_blocks=1)
    abbreviated: bool = True          # streamtype=2: tables stored once, spliced back on decode
    max_tokens: int = 0               # 0 = derive from noise images (see JpegTokenizer)
    bpe_vocab: int = 0                # 0 = raw bytes (vocab 256); JPEG-LM: 320

    def label(self) -> str:
        """Short preset-style name for plots and tables: quality, then what departs from JPEG-LM."""
        extra = "" if self.subsampling == "4:2:0" else f" {self.subsampling}"
        return (f"jpeg q{self.quality}{extra}" + ("" if self.restart_markers else " no-RST")
                + (f" bpe{self.bpe_vocab}" if self.bpe_vocab else ""))


def _marker_segments(data: bytes) -> list[tuple[int, int, int]]:
    """Walk the marker segments of a JPEG header up to and including the first SOS.

    Returns (marker, payload_start, payload_end) triples; skipping between markers follows
    libjpeg's ``next_marker`` (junk bytes and 0xFF fill are skipped, 0xFF00 is junk), so every
    SOF libjpeg would read is seen here. Returns [] if the header is malformed or truncated.
    """
    n, pos, out = len(data), 2, []
    if n < 4 or not data.startswith(SOI):
        return []
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0:
            return []
        while pos < n and data[pos] == 0xFF:
            pos += 1
        if pos >= n:
            return []
        marker = data[pos]
        pos += 1
        if marker == 0x00 or marker == 0x01 or 0xD0 <= marker <= 0xD7:
            continue                                   # stuffed byte, TEM, RSTn: no length
        if marker in (0xD8, 0xD9) or pos + 2 > n:
            return []                                  # second SOI / EOI before any scan
        seg_len = int.from_bytes(data[pos:pos + 2], "big")
        if seg_len < 2 or pos + seg_len > n:
            return []
        out.append((marker, pos + 2, pos + seg_len))
        if marker == _SOS:
            return out
        pos += seg_len


def header_ok(data: bytes, height: int, width: int) -> bool:
    """Cheap pre-check of an untrusted JPEG stream before Pillow allocates anything.

    True iff the stream starts with SOI, has at least one SOF before its first SOS, every such
    SOF declares exactly ``height``×``width``, and an EOI follows the scan (Pillow's
    LOAD_TRUNCATED_IMAGES is a process-wide switch other code may flip; requiring EOI keeps
    truncated streams invalid regardless).
    """
    segments = _marker_segments(data)
    if not segments:
        return False
    frames = [data[a:b] for m, a, b in segments if m in _SOF]
    if not frames or any(len(f) < 6 or (int.from_bytes(f[1:3], "big"), int.from_bytes(f[3:5], "big"))
                         != (height, width) for f in frames):
        return False
    return data.find(EOI, segments[-1][2]) >= 0


def restart_prefix_length(data: bytes, ratio: float) -> int:
    """Bytes of ``data`` (one JPEG stream) up to and including the restart marker that ends
    the top ``kept_rows(R, ratio)`` MCU rows of the image (R = MCU rows): the header, then
    whole 8·Hmax × 8·Vmax patches. The MCU size comes from the frame's sampling factors and
    the interval from the DRI segment. ValueError if the stream has no restart interval or
    too few markers for the cut.
    """
    segments = _marker_segments(data)
    sof = next((data[a:b] for m, a, b in segments if m in _SOF), None)
    dri = next((data[a:b] for m, a, b in segments if m == _DRI), None)
    if sof is None or len(sof) < 6 + 3 * sof[5] or not segments or segments[-1][0] != _SOS:
        raise ValueError("jpeg: cannot find the frame and scan headers to cut a prefix")
    interval = int.from_bytes(dri[:2], "big") if dri is not None and len(dri) >= 2 else 0
    if interval == 0:
        raise ValueError("jpeg: a prefix is cut at restart markers, but the stream has none; "
                         "set tokenizer.restart_markers=true")
    height, width = int.from_bytes(sof[1:3], "big"), int.from_bytes(sof[3:5], "big")
    factors = [sof[7 + 3 * c] for c in range(sof[5])]                 # H<<4 | V per component
    mcu_w, mcu_h = 8 * max(f >> 4 for f in factors), 8 * max(f & 15 for f in factors)
    per_row, rows = math.ceil(width / mcu_w), math.ceil(height / mcu_h)
    markers = (kept_rows(rows, ratio) * per_row) // interval          # RSTs before the cut
    scan = np.frombuffer(data, dtype=np.uint8)[segments[-1][2]:]
    # Entropy-coded data escapes every 0xFF as FF 00, so FF D0..D7 is always a restart marker.
    found = np.flatnonzero((scan[:-1] == 0xFF) & (scan[1:] >= 0xD0) & (scan[1:] <= 0xD7))
    if markers < 1 or len(found) < markers:
        raise ValueError(f"jpeg: the stream has {len(found)} restart markers, the prefix needs {markers}")
    return segments[-1][2] + int(found[markers - 1]) + 2


class JpegTokenizer:
    """JPEG file bytes (or byte-level BPE tokens of them) as tokens. Variable length; vocab
    256, or ``bpe_vocab`` with the merges learned by ``fit`` as its state.

    encode: (B, 3, H, W) uint8 → TokenBatch ids (B, L) int64 in [0, vocab_size), right-padded
    with 0, one stream per image (SOI … EOI, tables omitted when ``abbreviated``).
    decode: TokenBatch → Decoded (B, 3, H, W) uint8; undecodable streams are grey, valid=False.

    ``max_tokens`` (when the config leaves it 0) is derived once at construction: the longest
    stream among noise images of this size (uniform and 0/255 binary, seed 0), × 1.1, rounded
    up to a multiple of 16. Noise defeats the DCT's energy compaction, so natural images come
    out several times shorter; it is an empirical bound, not a proof (an image optimised to
    be long can pass it by a few percent), so ``encode`` raises rather than exceed it: set
    ``max_tokens`` explicitly for such data.
    """

    Config = JpegConfig
    vocab_size: int                   # per instance: 256, or cfg.bpe_vocab
    variable_length = True
    learned = False
    encode_in_workers = True  # CPU-bound per image: the cache writer's DataLoader workers encode
    video = False  # still images only
    frames = 0
    subcodes: tuple[int, ...] = ()

    def __init__(self, cfg: JpegConfig, image_size: tuple[int, int]) -> None:
        if not 1 <= cfg.quality <= 100:
            raise ValueError(f"jpeg.quality must be in [1, 100], got {cfg.quality}")
        if cfg.subsampling not in SUBSAMPLINGS:
            raise ValueError(f"jpeg.subsampling must be one of {SUBSAMPLINGS}, got {cfg.subsampling!r}")
        if cfg.max_tokens < 0:
            raise ValueError(f"jpeg.max_tokens must be >= 0, got {cfg.max_tokens}")
        if cfg.bpe_vocab != 0 and cfg.bpe_vocab <= 256:
            # 256 would be raw bytes under a second name (and label): one spelling per arm.
            raise ValueError(f"jpeg.bpe_vocab must be 0 (raw bytes) or > 256 (JPEG-LM: 320), got {cfg.bpe_vocab}")
        self.cfg = cfg
        self.bpe = ByteBPE(cfg.bpe_vocab or 256)
        self.vocab_size = self.bpe.vocab_size
        self.image_size = (int(image_size[0]), int(image_size[1]))
        h, w = self.image_size
        # DQT + DHT segments exactly as libjpeg writes them between SOI and EOI.
        tables_only = self._save(Image.new("RGB", (w, h)), streamtype=1)
        if not (tables_only.startswith(SOI) and tables_only.endswith(EOI)):
            raise RuntimeError("Pillow did not write a JPEG tables-only stream (streamtype=1)")
        self.tables: bytes = tables_only[2:-2]
        self._check_pillow_options()
        self.max_tokens = cfg.max_tokens or self._derive_max_tokens()

    def _save(self, img: Image.Image, streamtype: int) -> bytes:
        """One Pillow JPEG save of an RGB PIL image; streamtype 0 full, 1 tables, 2 abbreviated."""
        buf = io.BytesIO()
        options: dict[str, Any] = {"quality": self.cfg.quality, "subsampling": self.cfg.subsampling,
                                   "streamtype": streamtype}
        if self.cfg.restart_markers:
            options["restart_marker_blocks"] = 1       # JPEG-LM: RST after every MCU
        img.save(buf, format="JPEG", **options)
        return buf.getvalue()

    def _check_pillow_options(self) -> None:
        """Fail loudly where this Pillow silently drops restart markers or abbreviation."""
        h, w = self.image_size
        stream = self._save(Image.new("RGB", (w, h)), streamtype=2 if self.cfg.abbreviated else 0)
        markers = {m for m, _, _ in _marker_segments(stream)}
        if self.cfg.restart_markers and _DRI not in markers:
            raise RuntimeError(f"Pillow {Image.__version__} ignored restart_marker_blocks "
                               "(no DRI segment written); JPEG-LM's restart markers need a newer Pillow")
        if self.cfg.abbreviated and (0xDB in markers or 0xC4 in markers):
            raise RuntimeError(f"Pillow {Image.__version__} ignored streamtype=2 (tables still written)")

    def _derive_max_tokens(self) -> int:
        """1.1 × the longest stream among three noise images (seed 0), rounded up to 16.

        Uniform noise alone is not JPEG's worst case: 0/255 binary noise puts more energy
        into every DCT coefficient and encodes ~35-50% longer at q25 (32×32, 4:2:0: uniform
        326 B, binary per-channel 440 B, binary grey 481 B), so the bound takes the maximum.
        """
        h, w = self.image_size
        rng = np.random.default_rng(0)
        uniform = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        binary = (rng.integers(0, 2, size=(h, w, 3)) * 255).astype(np.uint8)
        binary_grey = np.repeat((rng.integers(0, 2, size=(h, w, 1)) * 255).astype(np.uint8), 3, axis=2)
        n = max(len(self._stream(x)) for x in (uniform, binary, binary_grey))
        return int(math.ceil(n * _MAX_TOKENS_MARGIN / 16) * 16)

    def _stream(self, hwc: np.ndarray) -> bytes:
        """Token bytes of one (H, W, 3) uint8 image."""
        return self._save(Image.fromarray(hwc), streamtype=2 if self.cfg.abbreviated else 0)

    def _streams(self, images: Tensor) -> list[bytes]:
        """(B, 3, H, W) uint8 → the B token byte streams; ValueError on another shape or dtype."""
        h, w = self.image_size
        if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != (3, h, w):
            raise ValueError(f"expected uint8 images of shape (B, 3, {h}, {w}), got {images.dtype} "
                             f"{tuple(images.shape)}")
        hwc = images.permute(0, 2, 3, 1).contiguous().cpu().numpy()    # (B, H, W, 3)
        return [self._stream(hwc[i]) for i in range(hwc.shape[0])]

    def fit(self, images: Tensor) -> dict[str, float]:
        """With ``bpe_vocab``: learn the BPE merges on the streams of (N, 3, H, W) uint8 train
        images and return its ``tok/bpe_*`` stats. Raw bytes: nothing to fit (the tables are
        fixed by quality/subsampling), {}."""
        if not self.cfg.bpe_vocab:
            return {}
        return self.bpe.fit(self._streams(images))

    def encode(self, images: Tensor) -> TokenBatch:
        """(B, 3, H, W) uint8 → TokenBatch (B, L) int64 in [0, vocab_size), L = longest stream."""
        streams = self._streams(images)
        for i, data in enumerate(streams):
            if len(data) > self.max_tokens:
                raise ValueError(f"jpeg: image {i} encodes to {len(data)} bytes > max_tokens="
                                 f"{self.max_tokens}; set jpeg.max_tokens explicitly")
        batch = pad_token_lists([torch.from_numpy(ids) for ids in self.bpe.encode_batch(streams)])
        return TokenBatch(ids=batch.ids.to(images.device), lengths=batch.lengths.to(images.device))

    def to_jpeg_bytes(self, ids: Tensor) -> bytes | None:
        """A complete JPEG file from one stream of ids (1-D; BPE tokens with ``bpe_vocab``, ids
        0..255 are always the raw bytes), tables spliced back after SOI when abbreviated; None
        if an id is outside the vocabulary (or never learned) or the stream lacks SOI."""
        data = self.bpe.decode(ids.detach().cpu())
        if data is None or not data.startswith(SOI):
            return None
        return SOI + self.tables + data[2:] if self.cfg.abbreviated else data

    def _decode_one(self, ids: Tensor) -> np.ndarray | None:
        """(L,) int64 → (H, W, 3) uint8, or None where the stream is not a decodable H×W RGB JPEG."""
        h, w = self.image_size
        data = self.to_jpeg_bytes(ids)
        if data is None or not header_ok(data, h, w):
            return None
        try:
            with warnings.catch_warnings():            # corrupt generated metadata warns; it's noise
                warnings.simplefilter("ignore")
                with Image.open(io.BytesIO(data), formats=["JPEG"]) as im:
                    if im.size != (w, h) or im.mode != "RGB":
                        return None
                    im.load()                          # truncated data raises (flag left off)
                    arr = np.asarray(im)
        except Exception as err:                       # OSError, SyntaxError, ValueError, struct.error ...
            log.debug("jpeg: stream failed to decode: %r", err)
            return None
        return arr if arr.shape == (h, w, 3) and arr.dtype == np.uint8 else None

    def decode(self, tokens: TokenBatch) -> Decoded:
        """TokenBatch → Decoded images (B, 3, H, W) uint8 and valid (B,) bool. Never raises on
        a bad stream: bad ids, a wrong header or size, truncation or any decoder error → grey."""
        h, w = self.image_size
        ids, lengths = tokens.ids.detach().cpu(), tokens.lengths.detach().cpu()
        b = ids.shape[0]
        images = grey_images(b, h, w)
        valid = torch.zeros(b, dtype=torch.bool)
        for i in range(b):
            n = int(lengths[i])
            if not 0 <= n <= ids.shape[1]:
                continue
            arr = self._decode_one(ids[i, :n])
            if arr is not None:
                images[i] = torch.from_numpy(arr.copy()).permute(2, 0, 1)
                valid[i] = True
        return Decoded(images=images.to(tokens.ids.device), valid=valid.to(tokens.ids.device))

    def prefix_lengths(self, tokens: TokenBatch, ratio: float) -> Tensor:
        """Per stream, the bytes through the restart marker that closes the top round(ratio·R)
        of its R MCU rows (JPEG-LM: "a prompt can be cut at a patch boundary"); needs
        ``restart_markers``. With BPE, the tokens that end at or before that byte (a token
        spanning the marker is left to the LM). (B,) int64."""
        if not self.cfg.restart_markers:
            raise ValueError("jpeg: prefix completion cuts streams at restart markers; "
                             "set tokenizer.restart_markers=true")
        cuts = []
        for i in range(len(tokens)):
            ids = tokens.ids[i, : int(tokens.lengths[i])].detach().cpu().numpy()
            data = self.bpe.decode(ids)
            if data is None:
                raise ValueError(f"jpeg: stream {i} holds ids outside the vocabulary")
            cuts.append(self.bpe.tokens_within(ids, restart_prefix_length(data, ratio)))
        return torch.tensor(cuts, dtype=torch.int64)

    def state_dict(self) -> dict[str, Any]:
        """``{"tables": (T,) uint8}``: the DQT/DHT bytes spliced back into abbreviated streams;
        with ``bpe_vocab`` also ``"bpe"``: the merges (``ByteBPE.state_dict``)."""
        state: dict[str, Any] = {"tables": torch.frombuffer(bytearray(self.tables), dtype=torch.uint8).clone()}
        if self.cfg.bpe_vocab:
            state["bpe"] = self.bpe.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the tables (and BPE merges) from ``state_dict`` (a cache decodes with the
        tables and merges that wrote it). ValueError where the state's BPE does not match
        ``bpe_vocab`` (raw-byte states have no "bpe")."""
        tables, bpe = state.get("tables"), state.get("bpe")
        if tables is None:
            raise ValueError("jpeg: state has no 'tables'")
        if self.cfg.bpe_vocab:
            if bpe is None:
                raise ValueError(f"jpeg: state has no 'bpe' merges, but bpe_vocab={self.cfg.bpe_vocab}")
            self.bpe.load_state_dict(bpe)
        elif bpe is not None and int(bpe.get("vocab_size", 256)) != 256:
            raise ValueError(f"jpeg: state holds a BPE of {bpe.get('vocab_size')} tokens, but bpe_vocab=0")
        data = torch.as_tensor(tables).to(torch.uint8).cpu().numpy().tobytes()
        if data != self.tables:
            log.warning("jpeg: loaded tables differ from this Pillow's for quality=%d subsampling=%s",
                        self.cfg.quality, self.cfg.subsampling)
        self.tables = data
