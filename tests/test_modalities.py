"""Named streams, time in seconds and per-token timesteps: tubelets, fractional RoPE, given tokens."""

from __future__ import annotations

import pytest
import torch
from helpers import build, random_condition, tiny_config

from omnidit.config import Config
from omnidit.errors import OmniditError
from omnidit.flow import training_loss, velocity_errors
from omnidit.model.math import apply_rope, rope_rotations
from omnidit.pipeline import Pipeline
from omnidit.sampling import sample, token_times
from omnidit.tokens import (
    check_frame_count,
    image_position_ids,
    patchify,
    tubelet_times,
    video_patchify,
    video_position_ids,
    video_unpatchify,
)


@pytest.mark.parametrize("frames,height,width,pt,p", [(4, 8, 8, 1, 2), (6, 8, 12, 2, 2), (9, 12, 4, 3, 4),
                                                      (2, 4, 4, 2, 1), (1, 6, 6, 1, 3)])
def test_video_patchify_round_trip(frames, height, width, pt, p):
    x = torch.randn(2, 3, frames, height, width, generator=torch.Generator().manual_seed(0))
    tokens = video_patchify(x, p, pt)
    assert tokens.shape == (2, (frames // pt) * (height // p) * (width // p), 3 * pt * p * p)
    assert torch.equal(video_unpatchify(tokens, frames, height, width, p, pt), x)
    # token 0 holds the first tubelet, channel-major like a Conv3d kernel
    assert torch.equal(tokens[:, 0], x[:, :, :pt, :p, :p].reshape(2, -1))


def test_an_image_is_a_clip_of_one_frame_at_time_zero():
    x = torch.randn(2, 3, 8, 12)
    assert torch.equal(video_patchify(x[:, :, None], 2, 1), patchify(x, 2))
    assert torch.equal(video_position_ids(1, 4, 6, fps=24.0), image_position_ids(4, 6, 3))


def test_video_positions_are_in_seconds_and_tubelets_sit_at_their_first_frame():
    ids = video_position_ids(8, 2, 3, fps=8.0, temporal_patch=2)
    assert ids.shape == (1, 4 * 6, 3)
    assert torch.allclose(ids[0, ::6, 0], torch.tensor([0.0, 0.25, 0.5, 0.75]))  # frame 2k at 2k / 8
    assert torch.equal(ids[0, :6, 1:], image_position_ids(2, 3, 3)[0, :, 1:])
    # the same instant at another frame rate has the same time coordinate
    assert tubelet_times(8, 8.0)[4] == tubelet_times(16, 16.0)[8] == 0.5


@pytest.mark.parametrize("frames,pt,nearest", [(7, 2, 6), (9, 4, 8), (0, 3, 3), (11, 4, 12)])
def test_a_frame_count_the_tubelet_does_not_divide_names_the_nearest_valid_count(frames, pt, nearest):
    with pytest.raises(OmniditError) as err:
        check_frame_count(frames, pt)
    assert f"the nearest is {nearest}" in err.value.hint
    check_frame_count(frames + (pt - frames % pt) % pt or pt, pt)  # a multiple passes


def test_rope_relativity_holds_for_fractional_time():
    axes = (4, 6, 6)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 1, 1, 16, generator=g).double().unbind(0)

    def score(pos_q, pos_k):
        rot = rope_rotations(torch.tensor([[pos_q, pos_k]], dtype=torch.float64), axes).double()
        return (apply_rope(q, rot[:, :, :1]) * apply_rope(k, rot[:, :, 1:])).sum().item()

    base = score((0.125, 2, 3), (0.5, 5, 1))
    for offset in [(1 / 3, 0, 0), (2.71828, 1.5, -0.25), (100.0625, 0, 0)]:
        moved = score(tuple(a + o for a, o in zip((0.125, 2, 3), offset)), tuple(a + o for a, o in zip((0.5, 5, 1),
                                                                                                         offset)))
        assert abs(moved - base) < 1e-6  # the rotations are float32
    assert abs(score((0.125, 2, 3), (0.625, 5, 1)) - base) > 1e-4  # another time difference changes it


def _clip_inputs(cfg, frames=4, size=8, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, frames, size, size, generator=g)
    tokens = video_patchify(x, cfg.patch_size, cfg.temporal_patch)
    ids = video_position_ids(frames, size // cfg.patch_size, size // cfg.patch_size, 8.0, cfg.temporal_patch)
    return tokens, ids, random_condition(cfg, batch, seed=seed)


def test_per_token_timesteps_equal_everywhere_give_the_scalar_result():
    cfg = tiny_config(temporal_patch=2, rope_time_scale=8.0)
    model = build(cfg)
    tokens, ids, cond = _clip_inputs(cfg)
    t = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        ref = model(tokens, ids, t, cond)
        per_token = model(tokens, ids, t[:, None].expand(-1, tokens.shape[1]).clone(), cond)
        per_stream = model({"img": tokens}, {"img": ids}, {"img": t}, cond)["img"]
    assert (per_token - ref).abs().max() <= 1e-6 * ref.abs().max()
    assert torch.equal(per_stream, ref)


def test_per_token_timesteps_modulate_each_token_by_its_own_time():
    cfg = tiny_config()
    model = build(cfg)
    tokens, ids, cond = _clip_inputs(cfg)
    n = tokens.shape[1]
    t = torch.full((2, n), 0.7)
    t[:, : n // 4] = 0.0  # the first frame given
    with torch.no_grad():
        mixed = model(tokens, ids, t, cond)
        uniform = model(tokens, ids, torch.tensor([0.7, 0.7]), cond)
        # a (1, N) pattern broadcasts over the batch
        assert torch.equal(model(tokens, ids, t[:1], cond), mixed)
    assert (mixed - uniform).abs().amax(dim=(0, 2))[: n // 4].min() > 1e-4  # every given token reads t = 0


def test_extra_streams_have_their_own_weights_and_share_the_time_axis():
    cfg = tiny_config(extra_streams={"audio": 10})
    model = build(cfg)
    assert model.stream_in["audio"].in_features == 10 and model.stream_out["audio"].linear.out_features == 10
    assert "audio" in model.double_blocks[0].streams
    tokens, ids, cond = _clip_inputs(cfg)
    audio = torch.randn(2, 6, 10)
    audio_ids = torch.zeros(1, 6, 3)
    audio_ids[0, :, 0] = torch.arange(6) / 12.0  # 12 audio frames per second
    with torch.no_grad():
        out = model({"img": tokens, "audio": audio}, {"img": ids, "audio": audio_ids}, torch.tensor([0.4, 0.9]),
                    cond)
        assert out["img"].shape == tokens.shape and out["audio"].shape == audio.shape
        # independent timesteps per stream, and a stream may be left out
        per_stream = model({"img": tokens, "audio": audio}, {"img": ids, "audio": audio_ids},
                           {"img": torch.tensor([0.0, 0.0]), "audio": torch.tensor([0.4, 0.9])}, cond)
        assert not torch.allclose(per_stream["audio"], out["audio"])
        alone = model({"audio": audio}, {"audio": audio_ids}, torch.tensor([0.4, 0.9]), cond)
        assert set(alone) == {"audio"} and not torch.allclose(alone["audio"], out["audio"])
    # an audio token and the video frame at the same instant see zero relative time
    _, pe = model.positions([ids, audio_ids], 0)
    frame_1 = 16  # img token 16 is the first patch of frame 1 (t = 1/8 s); audio token 1.5 would be too
    audio_at_quarter = ids.shape[1] + 3  # audio token 3: t = 3/12 = 0.25 s = frame 2
    time_slots = cfg.axes_dim[0] // 2
    assert torch.equal(pe[0, 0, 2 * frame_1, :time_slots], pe[0, 0, audio_at_quarter, :time_slots])
    with pytest.raises(OmniditError, match="no generated stream 'video'"):
        model({"video": tokens}, {"video": ids}, torch.tensor([0.5, 0.5]), cond)


def test_zero_init_multi_stream_model_outputs_zero():
    cfg = tiny_config(extra_streams={"audio": 10})
    model = build(cfg, random_weights=False)
    tokens, ids, cond = _clip_inputs(cfg)
    with torch.no_grad():
        out = model({"img": tokens, "audio": torch.randn(2, 3, 10)}, {"img": ids, "audio": torch.zeros(1, 3, 3)},
                    torch.rand(2, tokens.shape[1] + 3), cond)
    assert all(torch.equal(v, torch.zeros_like(v)) for v in out.values())


@pytest.mark.parametrize("sampler", ["euler", "heun", "midpoint"])
def test_samplers_leave_given_tokens_bit_identical(sampler):
    cfg = tiny_config()
    model = build(cfg)
    tokens, ids, cond = _clip_inputs(cfg)
    given = torch.zeros(1, tokens.shape[1], dtype=torch.bool)
    given[:, :16] = True  # frame 0
    given[:, -16:] = True  # and the last: interpolation
    calls = []

    def velocity(x, t):
        tt = token_times(t, given)
        calls.append(tt)
        return model(x, ids, tt, cond)

    noise = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = sample(velocity, noise, 5, sampler, given=given, given_tokens=tokens)
    assert torch.equal(out[:, given[0]], tokens[:, given[0]])
    assert not torch.allclose(out[:, ~given[0]], noise[:, ~given[0]])
    assert all(torch.equal(tt[:, given[0]], torch.zeros_like(tt[:, given[0]])) for tt in calls)


def test_the_loss_leaves_given_tokens_out():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 6, 4, generator=g), torch.randn(2, 6, 4, generator=g)
    t = torch.tensor([[0.0, 0.0, 0.5, 0.5, 0.5, 0.5], [0.3] * 6])

    def model(x, tt, c):  # a stand-in whose error is known: predicts 0
        return torch.zeros_like(x)

    errors = velocity_errors(model, x0, None, t, noise)
    target = (noise - x0).pow(2).mean(2)
    assert torch.allclose(errors, torch.stack([target[0, 2:].mean(), target[1].mean()]))
    assert torch.isclose(training_loss(model, x0, None, t, noise), errors.mean())


def _video_pipeline(frames=4):
    cfg = tiny_config(context_dim=0, pooled_dim=0, num_classes=3)
    config = Config()
    config.model, config.text.encoder = cfg, "none"
    config.data.width = config.data.height = 8
    config.data.frames, config.data.fps = frames, 8.0
    config.sample.steps, config.sample.cfg = 3, 2.0
    return Pipeline(model=build(cfg), config=config)


def test_generate_video_keeps_the_given_frame_and_is_seeded():
    pipe = _video_pipeline()
    first = torch.rand(1, 3, 4, 8, 8) * 2 - 1
    clip = pipe.generate_video(["1", "2"], seed=3, given=first, given_frames=[0])
    assert clip.shape == (2, 3, 4, 8, 8)
    assert torch.equal(clip[:, :, 0], first[:, :, 0].expand(2, -1, -1, -1))
    assert torch.equal(pipe.generate_video(["1", "2"], seed=3, given=first, given_frames=[0]), clip)
    free = pipe.generate_video(["1", "2"], seed=3)
    assert not torch.allclose(free[:, :, 0], clip[:, :, 0])
    # a one-frame clip is the image path
    assert torch.equal(pipe.generate_video(["1"], frames=1, seed=5)[:, :, 0], pipe.generate(["1"], seed=5))


@pytest.mark.parametrize("kwargs,message", [
    ({"frames": 0}, "frame count must be >= 1"),
    ({"fps": 0.0}, "fps must be > 0"),
    ({"fps": float("nan")}, "fps must be a finite number"),
    ({"given": torch.zeros(1, 3, 4, 8, 16), "given_frames": [0]}, "given frames must be"),
    ({"given": torch.zeros(1, 3, 4, 8, 8), "given_frames": [4]}, "outside the 4 frames"),
])
def test_generate_video_rejects_bad_input_with_one_line(kwargs, message):
    with pytest.raises(OmniditError, match=message):
        _video_pipeline().generate_video(["1"], **kwargs)


def test_training_clips_get_the_three_context_patterns_at_the_given_rate():
    from omnidit.flow import draw_given_tubelets, token_times_with_context

    given = draw_given_tubelets(4000, 8, 0.3, torch.Generator().manual_seed(0))
    rows = {tuple(r.tolist()) for r in given}
    first = (True,) + (False,) * 7
    assert first in rows and (True,) + (False,) * 6 + (True,) in rows  # image-to-video, interpolation
    assert (True, True, True, True, False, False, False, False) in rows  # extension by k = 4
    assert all(r[0] or not any(r) for r in rows)  # every pattern starts at the first tubelet
    assert abs(given.any(1).float().mean() - 0.3) < 0.03
    assert not draw_given_tubelets(100, 1, 1.0, torch.Generator().manual_seed(0)).any()
    t = token_times_with_context(torch.tensor([0.5, 0.9]), given[:2] | torch.tensor([[True] + [False] * 7] * 2), 16)
    assert t.shape == (2, 16) and (t[:, :2] == 0).all() and set(t[0].tolist()) <= {0.0, 0.5}


def test_per_token_modulation_projects_each_distinct_vector_once_and_gathers_it():
    from omnidit.model.layers import Modulation, TokenVectors

    mod = Modulation(8, 3)
    torch.nn.init.normal_(mod.lin.weight)
    g = torch.Generator().manual_seed(0)
    vectors, index = torch.randn(2, 3, 8, generator=g), torch.randint(0, 3, (2, 5), generator=g)
    per_token = torch.stack([vectors[b, index[b]] for b in range(2)])  # (2, 5, 8) explicitly
    expected = mod.lin(torch.nn.functional.silu(per_token)).chunk(3, dim=-1)
    for got, want in zip(mod(TokenVectors(vectors, index)), expected):
        torch.testing.assert_close(got, want)
    # a joint sequence: a (B, D) segment broadcast over its tokens, then the per-token one
    shared = torch.randn(2, 8, generator=g)
    joint = mod([(shared, 4), (TokenVectors(vectors, index), 5)])
    assert joint[0].shape == (2, 9, 8)
    torch.testing.assert_close(joint[0][:, :4], mod(shared)[0].expand(-1, 4, -1))
    torch.testing.assert_close(joint[0][:, 4:], expected[0])


def test_a_scalar_time_is_one_tensor_for_every_stream():
    model = build(tiny_config(extra_streams={"audio": 10}))
    times = model.stream_times(torch.tensor(0.5), 2, {"img": 16, "audio": 6})
    assert times["img"] is times["audio"] and times["img"].shape == (2,)
    per_token = model.stream_times(torch.full((2, 22), 0.5), 2, {"img": 16, "audio": 6})
    assert all(t.shape == (2,) for t in per_token.values())  # equal over each stream: the per-sample path


def test_stream_timesteps_are_shared_or_drawn_per_stream():
    from omnidit.flow import sample_timesteps, stream_timesteps

    def draw_all(p: float, seed: int = 0) -> dict:
        g = torch.Generator().manual_seed(seed)
        t = sample_timesteps(400, generator=g)
        return t, stream_timesteps(t, ["img", "audio"], p, lambda n: sample_timesteps(n, generator=g), g)

    t, shared = draw_all(0.0)
    assert shared["img"] is t and torch.equal(shared["audio"], t)
    t, apart = draw_all(1.0)
    assert torch.equal(apart["img"], t) and bool((apart["audio"] != t).all())
    t, mixed = draw_all(0.3)
    differs = (mixed["audio"] != t).float().mean().item()
    assert 0.22 < differs < 0.38  # about 30% of samples get their own audio time
    assert all(torch.equal(a, b) for a, b in zip(mixed.values(), draw_all(0.3)[1].values()))  # seeded
    with pytest.raises(ValueError, match="independent_p"):
        stream_timesteps(t, ["img", "audio"], 1.5, lambda n: t[:n], torch.Generator())
    # the model reads them: the audio stream's output follows its own time, not the image's
    cfg = tiny_config(extra_streams={"audio": 10})
    model = build(cfg)
    tokens, ids, cond = _clip_inputs(cfg)
    audio, audio_ids = torch.randn(2, 6, 10), torch.zeros(1, 6, 3)
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([0.3, 0.8])
    times = stream_timesteps(t, ["img", "audio"], 1.0, lambda n: torch.tensor([0.9, 0.1]), g)
    with torch.no_grad():
        joint = model({"img": tokens, "audio": audio}, {"img": ids, "audio": audio_ids}, t, cond)
        apart = model({"img": tokens, "audio": audio}, {"img": ids, "audio": audio_ids}, times, cond)
    assert not torch.allclose(joint["audio"], apart["audio"])
