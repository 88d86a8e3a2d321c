"""H.264 bytes as tokens: AVC-LM's recipe (Han et al. 2024, arXiv 2408.08459) via PyAV/libx264.

A clip of T frames is encoded with libx264 into an Annex-B byte stream held in memory, and
every byte (or byte-level BPE token) is one token; the LM sees no vision-specific structure.
AVC-LM's settings are the defaults:

- ``profile="baseline"``, constant ``qp=37``, no B-frames (the stream is in display order,
  so a prefix of it is a prefix of the clip), one IDR frame at the start (no scene cuts).
- ``slice_mbs=1``: one macroblock per slice. Every 16×16 patch starts a new NAL unit with
  its own start code and slice header, so the entropy coder restarts at every patch (the
  video analogue of JPEG-LM's restart markers) and a clip can be cut at a frame boundary.
- cheap motion search (``motion_search="dia"``), single thread: x264's output depends on
  its thread count, and a token cache must not depend on the machine that wrote it.
- x264 writes its version and every option as an SEI message (user data unregistered,
  ~600 bytes per clip): noise to the LM, and the stream decodes without it, so it is removed.
- The SPS and PPS are identical for every clip of a given size and setting; with
  ``header="fixed"`` they are left out of the tokens, kept once and put back on decode
  (like JPEG's abbreviated tables). ``header="inline"`` keeps them in every stream.

Generated streams are untrusted: ``decode`` accepts a parameter set only if it is
byte-identical to the one this tokenizer writes (so a stream cannot declare another size),
decodes with FFmpeg's H.264 decoder inside a catch-all, and never raises. Frames count only
up to the first one FFmpeg finds an error in or has to conceal (see ``decode_stream``). A
stream that decodes to fewer than T frames is padded with its last frame and counted in
``Decoded.frames``; one that decodes to no frame is invalid (grey).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av
import numpy as np
import torch
from torch import Tensor

from .base import Decoded, TokenBatch, kept_rows, pad_token_lists
from .bpe import ByteBPE

log = logging.getLogger(__name__)

PROFILES = ("baseline", "main", "high")
HEADERS = ("fixed", "inline")
MOTION_SEARCHES = ("dia", "hex", "umh", "esa")
START = b"\x00\x00\x01"
NAL_SLICE, NAL_IDR, NAL_SEI, NAL_SPS, NAL_PPS = 1, 5, 6, 7, 8
SEI_USER_DATA_UNREGISTERED = 5  # x264's version/options message
_MAX_TOKENS_MARGIN = 1.1


@dataclass
class H264Config:
    """Configuration of the H.264-bytes tokenizer. Defaults are AVC-LM's.

    Frames per clip, frame rate and resolution come from the data (``data.frames``,
    ``data.fps``, ``data.image_size``); AVC-LM: 15 frames at 3 fps, 256×144.
    """

    name: str = "h264"
    qp: int = 37                      # AVC-LM: constant QP 37 (0-51, lower = more bytes)
    profile: str = "baseline"         # AVC-LM: baseline (CAVLC, no B-frames)
    slice_mbs: int = 1                # macroblocks per slice; AVC-LM: 1; 0 = one slice per frame
    keyint: int = 0                   # frames between IDR frames; 0 = one IDR per clip (AVC-LM)
    motion_search: str = "dia"        # x264 --me; AVC-LM: a cheap motion search
    strip_sei: bool = True            # drop x264's version/options SEI (AVC-LM)
    header: str = "fixed"             # fixed: SPS/PPS stored once, put back on decode; inline: in every stream
    bpe_vocab: int = 0                # 0 = raw bytes (vocab 256); AVC-LM: 1024
    max_tokens: int = 0               # 0 = derive from noise clips (see H264Tokenizer)

    def label(self) -> str:
        """Short preset-style name for plots and tables: QP, then what departs from AVC-LM."""
        extra = "" if self.profile == "baseline" else f" {self.profile}"
        extra += "" if self.slice_mbs == 1 else f" {self.slice_mbs or 'frame'}-mb slices"
        extra += "" if self.header == "fixed" else " inline-SPS"
        return f"h264 qp{self.qp}{extra}" + (f" bpe{self.bpe_vocab}" if self.bpe_vocab else "")


@dataclass(frozen=True)
class Nal:
    """One NAL unit of an Annex-B stream: ``data[start:end]`` (start code included) and its type."""

    start: int
    end: int
    type: int


def split_nals(data: bytes) -> list[Nal]:
    """The NAL units of an Annex-B byte stream, in order.

    Each unit spans from its start code (00 00 01, or 00 00 00 01 — the leading zero belongs
    to the unit it introduces) to the next one; bytes before the first start code are not a
    unit. Emulation prevention guarantees 00 00 01 never occurs inside a unit.
    """
    starts = []
    pos = data.find(START)
    while pos >= 0:
        starts.append(pos - 1 if pos > 0 and data[pos - 1] == 0 else pos)
        pos = data.find(START, pos + 3)
    nals = []
    for j, s in enumerate(starts):
        end = starts[j + 1] if j + 1 < len(starts) else len(data)
        head = data.find(START, s) + 3
        nals.append(Nal(s, end, data[head] & 0x1F if head < end else -1))
    return nals


def _payload(data: bytes, nal: Nal) -> bytes:
    """The bytes of ``nal`` after its start code and one-byte header."""
    return data[data.find(START, nal.start) + 4 : nal.end]


def _is_encoder_sei(data: bytes, nal: Nal) -> bool:
    """True for an SEI NAL whose first message is user data unregistered (x264's options string)."""
    if nal.type != NAL_SEI:
        return False
    payload, kind, i = _payload(data, nal), 0, 0
    while i < len(payload) and payload[i] == 0xFF:  # payload type: 0xFF bytes + final byte
        kind, i = kind + 255, i + 1
    return i < len(payload) and kind + payload[i] == SEI_USER_DATA_UNREGISTERED


def token_units(data: bytes, strip_sei: bool, drop_header: bool) -> tuple[bytes, bytes]:
    """(the units of an x264 stream that become tokens, its SPS + PPS units): x264's options
    SEI left out when ``strip_sei``, the parameter sets left out of the first when ``drop_header``."""
    nals = [n for n in split_nals(data) if not (strip_sei and _is_encoder_sei(data, n))]
    header = b"".join(data[n.start : n.end] for n in nals if n.type in (NAL_SPS, NAL_PPS))
    kept = [n for n in nals if not (drop_header and n.type in (NAL_SPS, NAL_PPS))]
    return b"".join(data[n.start : n.end] for n in kept), header


@functools.lru_cache(maxsize=64)
def _parameter_sets(header: bytes) -> frozenset[bytes]:
    """The SPS/PPS units of ``header``, start-code zeros stripped (3- and 4-byte codes compare equal)."""
    return frozenset(header[n.start : n.end].lstrip(b"\x00") for n in split_nals(header))


def frame_starts(data: bytes) -> list[int]:
    """Byte offsets where the slices of a new frame begin: slice NALs (IDR or not) whose
    ``first_mb_in_slice`` is 0 — ue(v) 0 is the single bit 1, the top bit of the slice header."""
    starts = []
    for nal in split_nals(data):
        payload = _payload(data, nal)
        if nal.type in (NAL_SLICE, NAL_IDR) and payload and payload[0] & 0x80:
            starts.append(nal.start)
    return starts


def _x264_options(cfg: H264Config, frames: int) -> dict[str, str]:
    """libx264 private options for ``cfg``; threads pinned to 1 so bytes are machine-independent."""
    keyint = cfg.keyint or frames
    params = [f"keyint={keyint}", f"min-keyint={keyint}", "scenecut=0", "bframes=0", f"me={cfg.motion_search}",
              "threads=1", "sliced-threads=0", "lookahead-threads=1"]
    if cfg.slice_mbs:
        params.append(f"slice-max-mbs={cfg.slice_mbs}")
    return {"profile": cfg.profile, "qp": str(cfg.qp), "x264-params": ":".join(params)}


def encode_clip(frames: np.ndarray, options: dict[str, str], fps: float) -> bytes:
    """(T, H, W, 3) uint8 RGB frames → the Annex-B stream libx264 writes for them (in memory)."""
    t, h, w, _ = frames.shape
    ctx = av.CodecContext.create("libx264", "w")
    ctx.width, ctx.height, ctx.pix_fmt = w, h, "yuv420p"
    rate = Fraction(fps).limit_denominator(1001)
    ctx.framerate, ctx.time_base = rate, 1 / rate
    ctx.thread_count = 1
    ctx.options = dict(options)
    out = []
    for i in range(t):
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[i]), format="rgb24").reformat(format="yuv420p")
        frame.pts = i
        out.extend(bytes(p) for p in ctx.encode(frame))
    out.extend(bytes(p) for p in ctx.encode(None))
    return b"".join(out)


def decode_stream(data: bytes, height: int, width: int, max_frames: int) -> list[np.ndarray]:
    """Up to ``max_frames`` (H, W, 3) uint8 RGB frames FFmpeg decodes from an Annex-B stream,
    in order, up to the first frame it cannot decode cleanly.

    Strict on purpose: FFmpeg conceals broken or missing macroblocks (grey, or copied from
    the previous frame) and would hand back a "frame" for almost any bytes. Here a slice
    error raises (``err_detect=explode``) and a frame with concealed macroblocks
    (``is_corrupt``) is not a frame, so what comes back is what the stream really encodes.
    Never raises: an error, a frame of another size or a concealed frame ends decoding with
    the frames decoded so far. The parser is flushed so the last frame is not lost.
    """
    frames: list[np.ndarray] = []
    try:
        ctx = av.CodecContext.create("h264", "r")
        ctx.thread_count = 1
        ctx.options = {"err_detect": "explode"}
        packets = ctx.parse(data) + ctx.parse(None)
        for packet in [*packets, None]:
            for frame in ctx.decode(packet):
                if frame.is_corrupt or (frame.height, frame.width) != (height, width) or len(frames) >= max_frames:
                    return frames
                frames.append(frame.to_ndarray(format="rgb24"))
    except Exception as err:  # noqa: BLE001 — FFmpeg errors (InvalidDataError, ValueError ...) end the clip
        log.debug("h264: decoding stopped after %d frames: %r", len(frames), err)
    return frames


class H264Tokenizer:
    """H.264 clip bytes (or byte-level BPE tokens) as tokens. Variable length; vocab 256 or ``bpe_vocab``.

    encode: (B, T, 3, H, W) uint8 → TokenBatch (B, L) int64, one stream per clip.
    decode: TokenBatch → Decoded images (B, T, 3, H, W) uint8, valid (B,), frames (B,) decoded.

    ``max_tokens`` (config 0) is derived at construction like JPEG's: the longest stream of
    three noise clips (uniform, 0/255 binary per channel and grey, every frame fresh noise so
    motion compensation finds nothing), × 1.1, rounded up to 16; ``encode`` raises rather than
    exceed it.
    """

    Config = H264Config
    variable_length = True
    learned = False
    encode_in_workers = True  # CPU-bound per image: the cache writer's DataLoader workers encode
    video = True
    subcodes: tuple[int, ...] = ()

    def __init__(self, cfg: H264Config, image_size: tuple[int, int], frames: int = 0, fps: float = 3.0) -> None:
        _check_config(cfg, image_size, frames, fps)
        self.cfg, self.frames, self.fps = cfg, int(frames), float(fps)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.options = _x264_options(cfg, self.frames)
        self.bpe = ByteBPE(cfg.bpe_vocab or 256)
        self.vocab_size = self.bpe.vocab_size
        h, w = self.image_size
        self.header = self._units(np.full((self.frames, h, w, 3), 128, np.uint8))[1]
        self.max_tokens = cfg.max_tokens or _derive_max_tokens(self)

    # --- bytes -------------------------------------------------------------------------
    def _units(self, frames: np.ndarray) -> tuple[bytes, bytes]:
        """(token bytes, SPS + PPS bytes) of x264's stream of (T, H, W, 3) uint8 frames."""
        data = encode_clip(frames, self.options, self.fps)
        return token_units(data, self.cfg.strip_sei, drop_header=self.cfg.header == "fixed")

    def clip_bytes(self, frames: np.ndarray) -> bytes:
        """The token bytes of one (T, H, W, 3) uint8 clip (header left out when ``header="fixed"``)."""
        data, header = self._units(frames)
        if self.cfg.header == "fixed" and header != self.header:  # one SPS/PPS per size and setting: guard it
            raise RuntimeError("h264: a clip's SPS/PPS differ from the fixed header; set tokenizer.header=inline")
        return data

    def to_h264_bytes(self, data: bytes) -> bytes | None:
        """A decodable Annex-B stream from token bytes: the fixed header put back in front;
        None where the stream carries a parameter set this tokenizer did not write."""
        known = _parameter_sets(self.header)
        for nal in split_nals(data):
            if nal.type in (NAL_SPS, NAL_PPS) and data[nal.start : nal.end].lstrip(b"\x00") not in known:
                return None
        return data if self.cfg.header == "inline" else self.header + data

    # --- the tokenizer protocol -----------------------------------------------------------
    def fit(self, images: Tensor) -> dict[str, float]:
        """Stage 1: learn the byte-level BPE (``bpe_vocab`` > 0) on the streams of (N, T, 3, H, W)
        uint8 train clips; nothing to fit for raw bytes ({})."""
        if self.cfg.bpe_vocab == 0:
            return {}
        return self.bpe.fit([self.clip_bytes(c) for c in self._frames_hwc(images)])

    def _frames_hwc(self, clips: Tensor) -> np.ndarray:
        """(B, T, 3, H, W) uint8 → (B, T, H, W, 3) numpy, ValueError on another shape."""
        h, w = self.image_size
        if clips.dtype != torch.uint8 or clips.dim() != 5 or tuple(clips.shape[1:]) != (self.frames, 3, h, w):
            raise ValueError(f"h264: expected uint8 clips of shape (B, {self.frames}, 3, {h}, {w}), got "
                             f"{clips.dtype} {tuple(clips.shape)}")
        return clips.permute(0, 1, 3, 4, 2).contiguous().cpu().numpy()

    def encode(self, images: Tensor) -> TokenBatch:
        """(B, T, 3, H, W) uint8 clips → TokenBatch (B, L) int64 in [0, vocab_size), L = longest stream."""
        streams = self.bpe.encode_batch([self.clip_bytes(c) for c in self._frames_hwc(images)])
        for i, ids in enumerate(streams):
            if len(ids) > self.max_tokens:
                raise ValueError(f"h264: clip {i} encodes to {len(ids)} tokens > max_tokens={self.max_tokens}; "
                                 "set tokenizer.max_tokens explicitly")
        batch = pad_token_lists([torch.from_numpy(ids) for ids in streams])
        return TokenBatch(ids=batch.ids.to(images.device), lengths=batch.lengths.to(images.device))

    def _stream_bytes(self, tokens: TokenBatch, i: int) -> bytes | None:
        n = int(tokens.lengths[i])
        if not 0 <= n <= tokens.ids.shape[1]:
            return None
        return self.bpe.decode(tokens.ids[i, :n].detach().cpu().numpy())

    def decode(self, tokens: TokenBatch) -> Decoded:
        """TokenBatch → Decoded clips (B, T, 3, H, W) uint8, valid (B,) bool, frames (B,) int64.

        Never raises. A clip with d < T decoded frames repeats its last frame (``frames`` = d);
        one with none is grey and invalid; frames past T are dropped.
        """
        h, w = self.image_size
        b = len(tokens)
        images = torch.full((b, self.frames, 3, h, w), 128, dtype=torch.uint8)
        counts = torch.zeros(b, dtype=torch.int64)
        for i in range(b):
            data = self._stream_bytes(tokens, i)
            stream = None if data is None else self.to_h264_bytes(data)
            decoded = [] if stream is None else decode_stream(stream, h, w, self.frames)
            if decoded:
                clip = np.stack(decoded + [decoded[-1]] * (self.frames - len(decoded)))  # (T, H, W, 3)
                images[i] = torch.from_numpy(clip).permute(0, 3, 1, 2)
                counts[i] = len(decoded)
        device = tokens.ids.device
        return Decoded(images=images.to(device), valid=(counts > 0).to(device), frames=counts.to(device))

    def prefix_lengths(self, tokens: TokenBatch, ratio: float) -> Tensor:
        """Per stream, the tokens before the first slice of frame ``kept_rows(T, ratio)``: the prompt
        shows the first round(ratio·T) frames whole (AVC-LM: "given the first k frames,
        generate the rest"). With BPE, the last token boundary at or before that byte. (B,) int64."""
        keep = kept_rows(self.frames, ratio)
        cuts = []
        for i in range(len(tokens)):
            ids = tokens.ids[i, : int(tokens.lengths[i])].detach().cpu().numpy()
            data = self.bpe.decode(ids) or b""
            starts = frame_starts(data)
            if len(starts) <= keep:
                raise ValueError(f"h264: stream {i} has {len(starts)} frames, a prefix of {keep} needs more")
            cuts.append(self.bpe.tokens_within(ids, starts[keep]))
        return torch.tensor(cuts, dtype=torch.int64)

    def state_dict(self) -> dict[str, Any]:
        """``{"header": (n,) uint8 SPS+PPS bytes, "bpe": ByteBPE state}``."""
        return {"header": torch.frombuffer(bytearray(self.header), dtype=torch.uint8).clone(),
                "bpe": self.bpe.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the header and BPE a token cache was written with."""
        if "header" not in state:
            raise ValueError("h264: state has no 'header'")
        header = torch.as_tensor(state["header"]).to(torch.uint8).cpu().numpy().tobytes()
        if header != self.header:
            log.warning("h264: the stored SPS/PPS differ from this libx264's for %s", self.cfg.label())
        self.header = header
        if "bpe" in state:
            self.bpe.load_state_dict(state["bpe"])


def _check_config(cfg: H264Config, image_size: tuple[int, int], frames: int, fps: float) -> None:
    """ValueErrors named ``h264.<field>`` (config validation maps them to ``tokenizer.<field>``)."""
    h, w = image_size
    if frames <= 0:
        raise ValueError(f"data.frames must be > 0 for h264, which encodes clips (AVC-LM: 15), got {frames}")
    if fps <= 0:
        raise ValueError(f"data.fps must be > 0, got {fps}")
    if h % 2 or w % 2:
        raise ValueError(f"data.image_size must be even for h264 (4:2:0 chroma), got {h}×{w}")
    checks = [("qp", 0 <= cfg.qp <= 51, "in [0, 51]"), ("profile", cfg.profile in PROFILES, f"one of {PROFILES}"),
              ("header", cfg.header in HEADERS, f"one of {HEADERS}"),
              ("motion_search", cfg.motion_search in MOTION_SEARCHES, f"one of {MOTION_SEARCHES}"),
              ("slice_mbs", cfg.slice_mbs >= 0, ">= 0"), ("keyint", cfg.keyint >= 0, ">= 0"),
              ("max_tokens", cfg.max_tokens >= 0, ">= 0"),
              ("bpe_vocab", cfg.bpe_vocab == 0 or cfg.bpe_vocab > 256, "0 (raw bytes) or > 256 (AVC-LM: 1024)")]
    for key, ok, want in checks:
        if not ok:
            raise ValueError(f"h264.{key} must be {want}, got {getattr(cfg, key)!r}")


@functools.lru_cache(maxsize=16)
def _noise_bound(options: tuple[tuple[str, str], ...], shape: tuple[int, int, int], fps: float,
                 strip_sei: bool, header: str) -> int:
    """Bytes of the longest of three noise clips (seed 0); cached: config validation builds tokenizers often."""
    t, h, w = shape
    rng = np.random.default_rng(0)
    uniform = rng.integers(0, 256, size=(t, h, w, 3), dtype=np.uint8)
    binary = (rng.integers(0, 2, size=(t, h, w, 3)) * 255).astype(np.uint8)
    grey = np.repeat((rng.integers(0, 2, size=(t, h, w, 1)) * 255).astype(np.uint8), 3, axis=3)
    return max(len(token_units(encode_clip(clip, dict(options), fps), strip_sei, header == "fixed")[0])
               for clip in (uniform, binary, grey))


def _derive_max_tokens(tok: H264Tokenizer) -> int:
    n = _noise_bound(tuple(sorted(tok.options.items())), (tok.frames, *tok.image_size), tok.fps,
                     tok.cfg.strip_sei, tok.cfg.header)
    return int(math.ceil(n * _MAX_TOKENS_MARGIN / 16) * 16)
