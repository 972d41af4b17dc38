"""enable/disable contract, bad input, word maps, LoRA, gradient checkpointing, CPU offload."""

import pytest
import torch
from conftest import fresh_seed as _seed

import seg4diff_fast
from seg4diff_fast import FastCapture, disable_fast_capture, enable_fast_capture
from seg4diff_fast.testing import (
    record_stock_attention,
    reference_maps,
    tiny_clip_tokenizer,
    tiny_flux_pipeline,
    tiny_sd3_pipeline,
    tiny_sd3_transformer,
    tiny_t5_tokenizer,
)

PROMPT = "a cat on a red sofa"
KW = dict(num_inference_steps=2, height=32, width=32, max_sequence_length=8, output_type="latent")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sd3():
    p = tiny_sd3_pipeline()
    yield p
    disable_fast_capture(p)


@pytest.fixture(scope="module")
def flux():
    p = tiny_flux_pipeline()
    yield p
    disable_fast_capture(p)


@pytest.fixture(autouse=True)
def _unpatch_after(request):
    yield
    for name in ("sd3", "flux"):
        if name in request.fixturenames:
            disable_fast_capture(request.getfixturevalue(name))


def test_public_exports():
    for name in ("enable_fast_capture", "disable_fast_capture", "FastCapture", "joint_attention"):
        assert name in seg4diff_fast.__all__
    assert "tiny_sd3_pipeline" in (enable_fast_capture.__doc__ or "")
    import seg4diff_fast.magnet as magnet

    for name in ("MagnetConfig", "train_magnet", "load_magnet_lora"):  # the import line
        assert name in seg4diff_fast.__all__ and getattr(seg4diff_fast, name) is getattr(magnet, name)
    with pytest.raises(AttributeError):
        seg4diff_fast.no_such_name  # noqa: B018


def test_unsupported_models_raise_type_error():
    from types import SimpleNamespace

    for obj in (object(), torch.nn.Linear(2, 2), SimpleNamespace(transformer=torch.nn.Linear(2, 2))):
        with pytest.raises(TypeError, match="Stable Diffusion 3 .*Flux"):
            enable_fast_capture(obj, layers=[0])
        with pytest.raises(TypeError):
            disable_fast_capture(obj)


def test_capture_family_registry_and_names(sd3, flux):
    from types import SimpleNamespace

    from seg4diff_fast.capture import CAPTURE_FAMILIES, SUPPORTED, capture_family, count_layers
    from seg4diff_fast.capture.patch import _resolve

    assert list(CAPTURE_FAMILIES) == ["sd3", "flux", "flux2", "qwenimage"]
    assert capture_family(sd3) == capture_family(sd3.transformer) == "sd3"
    assert capture_family(flux) == capture_family(flux.transformer) == "flux"
    assert (count_layers(sd3), count_layers(flux)) == (3, 4)
    for family in CAPTURE_FAMILIES.values():  # every family is named in SUPPORTED and the enable docs
        assert family.description in SUPPORTED
    for words in ("Flux.2", "Flux2KleinPipeline", "Qwen-Image", "QwenImagePipeline"):
        assert words in enable_fast_capture.__doc__ and words in SUPPORTED, words
    assert CAPTURE_FAMILIES["qwenimage"].kwargs_arg == "attention_kwargs"
    assert {f.kwargs_arg for n, f in CAPTURE_FAMILIES.items() if n != "qwenimage"} == {"joint_attention_kwargs"}
    cap = enable_fast_capture(flux, layers=[0])
    assert cap.family == "flux" and isinstance(cap.family, str)
    disable_fast_capture(flux)
    for obj in (object(), SimpleNamespace(transformer=torch.nn.Linear(2, 2))):
        with pytest.raises(TypeError, match="Qwen-Image"):
            capture_family(obj)
    with pytest.raises(ValueError, match="twice"):
        CAPTURE_FAMILIES.register(CAPTURE_FAMILIES["sd3"])
    assert _resolve(sd3)[0] is CAPTURE_FAMILIES["sd3"]


def test_layer_out_of_range_and_bad_arguments(sd3, flux):
    with pytest.raises(ValueError, match=r"valid layers are 0\.\.2"):
        enable_fast_capture(sd3, layers=[3])
    with pytest.raises(ValueError, match=r"0\.\.2"):
        enable_fast_capture(sd3, layers=[-1])
    with pytest.raises(ValueError, match=r"valid layers are 0\.\.3 \(double-stream 0\.\.1, single-stream 2\.\.3\)"):
        enable_fast_capture(flux, layers=[4])
    with pytest.raises(ValueError, match="duplicates"):
        enable_fast_capture(sd3, layers=[1, 1])
    with pytest.raises(ValueError, match="mode"):
        enable_fast_capture(sd3, layers=[1], mode="softmax")
    with pytest.raises(ValueError, match="head_reduce"):
        enable_fast_capture(sd3, layers=[1], head_reduce="sum")
    cap = enable_fast_capture(sd3, layers=[1], tokens=[0, 200])
    with pytest.raises(ValueError, match=r"tokens \[200\]"):
        sd3(PROMPT, **KW)
    assert not cap.num_captured
    # nothing is patched after a rejected enable
    disable_fast_capture(sd3)
    enable_fast_capture(sd3, layers=[1])
    disable_fast_capture(sd3)
    assert all(type(p).__name__ == "JointAttnProcessor2_0" for p in sd3.transformer.attn_processors.values())


def test_enable_twice_is_one_patch_and_disable_is_idempotent(sd3):
    transformer = sd3.transformer
    hooks_before = len(transformer._forward_pre_hooks)
    stock = dict(transformer.attn_processors)
    disable_fast_capture(sd3)  # never enabled: no-op
    assert transformer.attn_processors == stock
    first = enable_fast_capture(sd3, layers=[0])
    second = enable_fast_capture(sd3.transformer, layers=[1, 2])
    assert len(transformer._forward_pre_hooks) == hooks_before + 1
    assert not first.enabled and second.enabled
    sd3(PROMPT, **KW)
    assert second.maps.shape[1] == 2
    with pytest.raises(RuntimeError, match="no maps captured"):
        _ = first.maps
    disable_fast_capture(sd3)
    disable_fast_capture(sd3)
    assert len(transformer._forward_pre_hooks) == hooks_before
    assert transformer.attn_processors == stock
    assert second.maps.shape[1] == 2  # maps stay readable after disabling


def test_maps_before_capture_reset_and_running_mean(sd3):
    cap = enable_fast_capture(sd3, layers=[1])
    assert isinstance(cap, FastCapture)
    with pytest.raises(RuntimeError, match="no maps captured"):
        _ = cap.maps
    seeds = (_seed(), _seed())
    with record_stock_attention(sd3.transformer) as rec:
        disable_fast_capture(sd3)
        for s in seeds:
            sd3(PROMPT, generator=torch.Generator().manual_seed(s), **KW)
    cap = enable_fast_capture(sd3, layers=[1])
    for s in seeds:  # two generations without reset: the mean over all 4 calls
        sd3(PROMPT, generator=torch.Generator().manual_seed(s), **KW)
    assert cap.num_captured == 4 and cap.captured_steps == [0, 1, 2, 3]
    ref = reference_maps(rec, sd3.transformer, [1], (8, 8), range(77), cfg=True)
    torch.testing.assert_close(cap.maps.double(), ref, rtol=1e-4, atol=1e-7)
    cap.reset()
    assert cap.num_captured == 0 and cap.step_count == 0
    with pytest.raises(RuntimeError):
        _ = cap.maps
    sd3(PROMPT, generator=torch.Generator().manual_seed(seeds[1]), **KW)
    ref = reference_maps(rec, sd3.transformer, [1], (8, 8), range(77), cfg=True, calls=[2, 3])
    torch.testing.assert_close(cap.maps.double(), ref, rtol=1e-4, atol=1e-7)
    with pytest.raises(RuntimeError, match="reset"):  # a new size without reset: refused before any block runs
        sd3(PROMPT, **{**KW, "width": 48})
    cap.reset()
    sd3(PROMPT, **{**KW, "width": 48})
    assert cap.maps.shape == (1, 1, 77, 8, 12)


def _expected_positions(tokenizer, prompt, word_pieces):
    """Positions of the given consecutive token strings in the tokenized prompt (independent lookup)."""
    toks = tokenizer.convert_ids_to_tokens(tokenizer(prompt)["input_ids"])
    for i in range(len(toks)):
        if toks[i:i + len(word_pieces)] == word_pieces:
            return list(range(i, i + len(word_pieces)))
    raise AssertionError(f"{word_pieces} not in {toks}")


def test_word_maps_merge_subwords_sd3(sd3):
    prompt = "A cat, on a red sofa."
    cap = enable_fast_capture(sd3, layers=[0, 2])
    sd3(prompt, **KW)
    tok = tiny_clip_tokenizer()
    words = cap.word_maps(prompt)
    assert list(words) == ["A", "cat", "on", "a", "red", "sofa"]  # punctuation stripped, case kept
    sofa = _expected_positions(tok, prompt, ["so", "fa</w>"])
    cat = _expected_positions(tok, prompt, ["cat</w>"])
    assert sofa == [7, 8] and cat == [2]  # BOS at 0
    maps = cap.maps
    torch.testing.assert_close(words["sofa"], maps[:, :, sofa].mean(2))
    torch.testing.assert_close(words["cat"], maps[:, :, 2])  # the comma's token (3) is not merged in
    assert words["sofa"].shape == (1, 2, 8, 8)
    assert cap.token_positions(PROMPT)["a"] == [1, 4]  # a repeated word collects every occurrence
    torch.testing.assert_close(cap.word_maps(PROMPT)["a"], maps[:, :, [1, 4]].mean(2))
    torch.testing.assert_close(cap.maps_at([1, 4]), maps[:, :, [1, 4]].mean(2))


def test_word_maps_truncation_and_custom_tokens(sd3):
    cap = enable_fast_capture(sd3, layers=[1], tokens=[2, 6, 7])
    sd3(PROMPT, **KW)
    assert cap.maps.shape == (1, 1, 3, 8, 8)
    with pytest.warns(UserWarning, match="outside the captured"):
        words = cap.word_maps(PROMPT)
    assert sorted(words) == ["cat", "sofa"]
    torch.testing.assert_close(words["sofa"], cap.maps[:, :, 1:].mean(2))
    cap = enable_fast_capture(sd3, layers=[1])
    sd3(PROMPT, **KW)
    long_prompt = " ".join(["cat"] * 80) + " dog"
    with pytest.warns(UserWarning, match="dog"):
        words = cap.word_maps(long_prompt)
    assert "dog" not in words and "cat" in words


def test_word_maps_flux_uses_t5_positions(flux):
    cap = enable_fast_capture(flux, layers=[1, 2])
    flux(PROMPT, **KW)
    tok = tiny_t5_tokenizer()
    sofa = _expected_positions(tok, PROMPT, ["▁so", "fa"])
    assert sofa == [5, 6]
    words = cap.word_maps(PROMPT)
    torch.testing.assert_close(words["sofa"], cap.maps[:, :, sofa].mean(2))
    torch.testing.assert_close(words["cat"], cap.maps[:, :, 1])


def test_word_maps_bare_transformer_needs_tokenizer():
    model = tiny_sd3_transformer()
    cap = enable_fast_capture(model, layers=[1])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model(hidden_states=torch.randn(1, 4, 8, 8, generator=g),
              encoder_hidden_states=torch.randn(1, 77, 32, generator=g),
              pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([10.0]))
    with pytest.raises(ValueError, match="tokenizer"):
        cap.word_maps(PROMPT)
    assert cap.word_maps(PROMPT, tokenizer=tiny_clip_tokenizer())["sofa"].shape == (1, 1, 4, 4)
    disable_fast_capture(model)


def _random_lora_state_dict(seed):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    src = tiny_sd3_transformer()
    src.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                               target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_k_proj"]))
    g = torch.Generator().manual_seed(seed)
    for name, p in src.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.3
    return {f"transformer.{k}": v for k, v in get_peft_model_state_dict(src).items()}


def test_lora_loaded_and_scaled_matches_stock():
    pipe = tiny_sd3_pipeline(qk_norm="rms_norm", dual_attention_layers=(0,))
    seed = _seed()
    base = pipe(PROMPT, generator=torch.Generator().manual_seed(seed), **KW).images
    pipe.load_lora_weights(_random_lora_state_dict(seed), adapter_name="test")
    runs = {}
    for scale in (1.0, 0.5):
        kw = dict(KW, joint_attention_kwargs={"scale": scale})
        with record_stock_attention(pipe.transformer) as rec:
            stock = pipe(PROMPT, generator=torch.Generator().manual_seed(seed), **kw).images
        cap = enable_fast_capture(pipe, layers=[0, 1])
        fast = pipe(PROMPT, generator=torch.Generator().manual_seed(seed), **kw).images
        torch.testing.assert_close(fast, stock, rtol=1e-5, atol=1e-5)
        ref = reference_maps(rec, pipe.transformer, [0, 1], (8, 8), range(77), cfg=True)
        torch.testing.assert_close(cap.maps.double(), ref, rtol=1e-4, atol=1e-7)
        disable_fast_capture(pipe)
        runs[scale] = stock
    assert (runs[1.0] - base).abs().max() > 1e-3  # the adapter does act
    assert (runs[1.0] - runs[0.5]).abs().max() > 1e-3  # and its scale reaches it through the processors


def _train_step(checkpointing, capture=True, map_loss=True, seed=0):
    model = tiny_sd3_transformer(seed=seed).train()
    if checkpointing:
        model.enable_gradient_checkpointing()
    cap = enable_fast_capture(model, layers=[1], mode="logits") if capture else None
    g = torch.Generator().manual_seed(seed + 1)
    out = model(hidden_states=torch.randn(2, 4, 16, 24, generator=g),
                encoder_hidden_states=torch.randn(2, 80, 32, generator=g),
                pooled_projections=torch.randn(2, 32, generator=g), timestep=torch.tensor([300.0, 700.0])).sample
    loss = out.square().mean()
    if map_loss:
        loss = loss + cap.maps.square().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads, cap


def test_gradient_checkpointing_captures_once_and_gradients_flow():
    seed = _seed() % 1000
    out_ck, g_ck, cap_ck = _train_step(True, seed=seed)
    out_pl, g_pl, cap_pl = _train_step(False, seed=seed)
    assert cap_ck.num_captured == 1 and cap_pl.num_captured == 1  # the backward recompute records nothing
    torch.testing.assert_close(out_ck, out_pl)
    assert g_ck.keys() == g_pl.keys()
    for name in g_pl:
        torch.testing.assert_close(g_ck[name], g_pl[name], rtol=1e-4, atol=1e-6, msg=name)
    # the map loss reaches the captured layer's q/k projections
    _, g_out_only, _ = _train_step(True, map_loss=False, seed=seed)
    diff = (g_ck["transformer_blocks.1.attn.to_k.weight"] - g_out_only["transformer_blocks.1.attn.to_k.weight"])
    assert diff.abs().max() > 0
    # and without the map loss, the gradients equal the stock processors'
    _, g_stock, _ = _train_step(False, capture=False, map_loss=False, seed=seed)
    for name in g_stock:
        torch.testing.assert_close(g_out_only[name], g_stock[name], rtol=1e-4, atol=1e-6, msg=name)


def test_model_cpu_offload():
    pipe = tiny_sd3_pipeline()
    seed = _seed()
    with record_stock_attention(pipe.transformer) as rec:
        stock = pipe(PROMPT, generator=torch.Generator().manual_seed(seed), **KW).images
    pipe.enable_model_cpu_offload(device="cpu")
    cap = enable_fast_capture(pipe, layers=[2])
    fast = pipe(PROMPT, generator=torch.Generator().manual_seed(seed), **KW).images
    torch.testing.assert_close(fast, stock, rtol=1e-5, atol=1e-5)
    ref = reference_maps(rec, pipe.transformer, [2], (8, 8), range(77), cfg=True)
    torch.testing.assert_close(cap.maps.double(), ref, rtol=1e-4, atol=1e-7)
    disable_fast_capture(pipe)


def test_no_layers_still_runs_fused_and_joint_attention_kwargs_pass_through(sd3):
    calls = []
    import seg4diff_fast.capture.processor as processor_mod  # the processors' one attention core

    original = processor_mod.joint_attention

    def counting(*args, **kwargs):
        calls.append(kwargs.get("capture_cols") is not None)
        return original(*args, **kwargs)

    processor_mod.joint_attention = counting
    try:
        cap = enable_fast_capture(sd3, layers=[])
        sd3(PROMPT, joint_attention_kwargs={"scale": 1.0}, **KW)
    finally:
        processor_mod.joint_attention = original
    assert len(calls) == 2 * 3 and not any(calls)  # every layer, every step, on the fused op
    with pytest.raises(RuntimeError):
        _ = cap.maps


def test_bench_pipeline_smoke():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_pipeline.py"
    spec = importlib.util.spec_from_file_location("bench_pipeline", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--device", "cpu", "--size", "64", "--num-layers", "3", "--layer", "1", "--reps", "1",
                         "--threads", "1", "--variants", "stock,authors@1,ours@1,ours@all"])
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"stock", "authors@1", "ours@1", "ours@all"}
    assert rows["authors@1"]["maps_rel_err_vs_ours"] < 1e-5  # the materialised maps agree with ours
    assert all(r["peak_mem_bytes"] is not None and r["time_s"] > 0 for r in rows.values())
