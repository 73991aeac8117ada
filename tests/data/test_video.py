"""Video frames: which frames are sampled, one tile each, decode errors. Videos are made here with
PyAV, every frame a flat grey level that encodes its index."""

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")

from megatron_internvl.data import video as video_mod  # noqa: E402
from megatron_internvl.data.images import IMAGENET_MEAN, IMAGENET_STD, MediaDecodeError  # noqa: E402
from megatron_internvl.data.video import (  # noqa: E402
    VideoDecodeError,
    load_video_tiles,
    read_video_frames,
    sample_frame_indices,
)

STEP = 12  # grey level of frame i is 10 + STEP*i: far apart next to codec error


def grey(i):
    return 10 + STEP * i


def make_video(path, n_frames, codec="mpeg4", container=None, size=(64, 48)):
    w, h = size
    with av.open(str(path), mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if codec == "mpeg4":
            stream.options = {"qscale": "1"}
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(np.full((h, w, 3), grey(i), np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def frame_ids(frames):
    """Recover each frame's index from its grey level."""
    return [int(round((np.asarray(f).mean() - 10) / STEP)) for f in frames]


def test_sample_rule():
    assert sample_frame_indices(20, 4) == [2, 7, 12, 17]  # middles of [0,5) [5,10) [10,15) [15,20)
    assert sample_frame_indices(10, 10) == list(range(10))
    assert sample_frame_indices(1, 3) == [0, 0, 0]
    assert sample_frame_indices(3, 6) == [0, 0, 1, 1, 2, 2]  # short video: frames repeat
    assert sample_frame_indices(100, 1) == [50]
    for n, k in [(7, 3), (1000, 8), (31, 16)]:
        idx = sample_frame_indices(n, k)
        # one index per segment [i*n/k, (i+1)*n/k)
        assert all(i * n <= idx[i] * k < (i + 1) * n for i in range(k)), idx
    with pytest.raises(ValueError, match="num_frames must be >= 1"):
        sample_frame_indices(10, 0)


@pytest.mark.parametrize("codec,container,suffix", [("mpeg4", None, "mp4"), ("libx264", "matroska", "mkv")])
def test_decoded_frames_are_the_sampled_ones(tmp_path, codec, container, suffix):
    # Matroska stores no frame count, which exercises counting by demuxing.
    path = make_video(tmp_path / f"clip.{suffix}", 20, codec, container)
    frames, indices = read_video_frames(path, 4)
    assert indices == [2, 7, 12, 17]
    assert frame_ids(frames) == indices
    frames, indices = read_video_frames(path.read_bytes(), 3)  # from bytes as well
    assert indices == [3, 10, 16] and frame_ids(frames) == indices


def test_one_tile_per_frame(tmp_path):
    path = make_video(tmp_path / "clip.mp4", 20)
    tiles = load_video_tiles(path, num_frames=5, image_size=56)
    assert tiles.shape == (5, 3, 56, 56) and tiles.dtype == torch.float32  # no thumbnails
    # a flat frame stays flat through the resize: check values of frame 2 against the rule
    expected_level = grey(sample_frame_indices(20, 5)[0]) / 255.0
    for ch in range(3):
        got = tiles[0, ch].mean().item()
        assert got == pytest.approx((expected_level - IMAGENET_MEAN[ch]) / IMAGENET_STD[ch], abs=0.05)
    # more frames asked than the video has: indices repeat, the count is what was asked for
    assert load_video_tiles(path, num_frames=30, image_size=56).shape[0] == 30


def test_no_augmentation_argument():
    import inspect

    params = inspect.signature(load_video_tiles).parameters
    assert not any("jpeg" in p or "augment" in p or "thumbnail" in p for p in params)


def test_overstated_frame_count_resamples(tmp_path, monkeypatch):
    """A container that claims more frames than decode: sampling is redone over the real ones."""
    path = make_video(tmp_path / "clip.mp4", 10)
    monkeypatch.setattr(video_mod, "_count_frames", lambda av_, src, name: 40)
    frames, indices = read_video_frames(path, 4)
    assert indices == sample_frame_indices(10, 4) == [1, 3, 6, 8]
    assert frame_ids(frames) == indices


def test_decode_errors(tmp_path):
    with pytest.raises(VideoDecodeError, match="nope.mp4: file not found"):
        load_video_tiles(tmp_path / "nope.mp4", num_frames=4)
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"definitely not a video" * 50)
    with pytest.raises(VideoDecodeError, match="garbage.mp4") as e:
        load_video_tiles(garbage, num_frames=4)
    assert isinstance(e.value, MediaDecodeError) and e.value.source == str(garbage)
    good = make_video(tmp_path / "clip.mp4", 20).read_bytes()
    (tmp_path / "truncated.mp4").write_bytes(good[: len(good) // 3])
    with pytest.raises(VideoDecodeError, match="truncated.mp4"):
        load_video_tiles(tmp_path / "truncated.mp4", num_frames=4)
    audio_only = tmp_path / "audio.wav"
    with av.open(str(audio_only), mode="w") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            out.mux(packet)
    with pytest.raises(VideoDecodeError, match="no video stream"):
        load_video_tiles(audio_only, num_frames=2)
    with pytest.raises(VideoDecodeError, match="empty"):
        load_video_tiles(b"", num_frames=2)
