"""Decoding sampled frames of a video file with PyAV (``av``), an optional dependency.

Imported only when a sample names a video file and ``av`` is installed (``pip install av``;
it bundles FFmpeg, so any container and codec FFmpeg reads works: MP4/H.264, MKV, WebM/VP9,
AVI, MOV ...). The frame count comes from the stream header, or from counting the packets
when the header has none; the frames at :func:`~lvlm_tune.data.video.sample_indices` are then
decoded in one pass. Problems raise ``ValueError`` (the loader names the sample).
"""

from __future__ import annotations

from PIL import Image


def _count_frames(path: str) -> int:
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        if stream.frames:
            return int(stream.frames)
        return sum(1 for packet in container.demux(stream) if packet.size)


def decode_frames(path: str, num_frames: int, max_pixels: int | None) -> list[Image.Image]:
    """The ``num_frames`` evenly sampled frames of the video file at ``path``, as RGB."""
    import av

    from lvlm_tune.data.video import sample_indices

    try:
        total = _count_frames(path)
        wanted = sample_indices(total, num_frames)
        out: dict[int, Image.Image] = {}
        with av.open(path) as container:
            stream = container.streams.video[0]
            if max_pixels is not None and stream.width * stream.height > max_pixels:
                raise ValueError(
                    f"{stream.width}x{stream.height} frames, more than max_image_pixels="
                    f"{max_pixels:,}"
                )
            for k, frame in enumerate(container.decode(stream)):
                if k in wanted:
                    out[k] = frame.to_image().convert("RGB")
                if k >= wanted[-1]:
                    break
    except (av.error.FFmpegError, IndexError, OSError) as err:
        raise ValueError(f"cannot decode video: {type(err).__name__}: {err}") from err
    if len(out) < len(set(wanted)):
        raise ValueError(f"decoded {len(out)} of the {total} frames its header announces")
    return [out[k] for k in wanted]
