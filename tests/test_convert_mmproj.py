"""`gemma-mlx-convert model.gguf --mmproj mmproj.gguf`: a Gemma 4 GGUF with llama.cpp's towers file
converts into a multimodal MLX directory that computes what transformers computes on the weights
the two files hold; a wrong, damaged or missing mmproj is one clear error."""

from __future__ import annotations

import json

import pytest
from convert_sources import run_converter, staging_leftovers
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter
from gguf_reference import finish, reference_state_dict, write_gguf
from mmproj_reference import load_back, write_mmproj, write_unified_mmproj
from multimodal_chat_model import MEDIA_TOKENS, write_image
from multimodal_reference import VARIANTS, save_reference
from test_convert_multimodal import assert_logits_match
from test_multimodal_parity import one_torch_thread  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def e2b_files(tmp_path_factory):
    """(transformers model holding the files' values, model GGUF, mmproj GGUF) of the E2B shape."""
    directory = tmp_path_factory.mktemp("e2b-gguf")
    torch_model = save_reference(VARIANTS["e2b"](), directory / "hf")
    stored = write_gguf(torch_model, directory / "model.gguf", T.Q8_0, special=MEDIA_TOKENS)
    reference_state_dict(torch_model, stored)
    load_back(torch_model, write_mmproj(torch_model, directory / "mmproj.gguf"))
    return torch_model, directory / "model.gguf", directory / "mmproj.gguf"


def test_gguf_with_mmproj_matches_transformers(e2b_files, tmp_path):
    torch_model, model_gguf, mmproj = e2b_files
    status, stderr = run_converter(model_gguf, "--mmproj", mmproj, "-o", tmp_path / "mlx")
    assert status == 0, stderr
    config = json.loads((tmp_path / "mlx" / "config.json").read_text())
    assert config["model_type"] == "gemma4" and "audio_config" in config
    assert_logits_match(torch_model, tmp_path / "mlx", "e2b")


def test_gguf_with_the_12b_unified_mmproj_matches_transformers(tmp_path):
    """The 12B: llama.cpp's `gemma4uv`/`gemma4ua` projector (encoder-free embedders, patch
    columns in CHW order, position table transposed) gives transformers' logits with an image
    and audio in the prompt."""
    torch_model = save_reference(VARIANTS["12b"](), tmp_path / "hf")
    stored = write_gguf(torch_model, tmp_path / "model.gguf", T.Q8_0, special=MEDIA_TOKENS)
    reference_state_dict(torch_model, stored)
    load_back(torch_model, write_unified_mmproj(torch_model, tmp_path / "mmproj.gguf"))
    status, stderr = run_converter(
        tmp_path / "model.gguf", "--mmproj", tmp_path / "mmproj.gguf", "-o", tmp_path / "mlx"
    )
    assert status == 0, stderr
    config = json.loads((tmp_path / "mlx" / "config.json").read_text())
    assert config["model_type"] == "gemma4_unified"
    assert config["vision_config"]["pooling_kernel_size"] == 3
    assert config["audio_config"]["audio_embed_dim"] == 20
    assert_logits_match(torch_model, tmp_path / "mlx", "12b")


def test_gguf_without_mmproj_stays_text_only(e2b_files, tmp_path):
    _, model_gguf, _ = e2b_files
    status, stderr = run_converter(model_gguf, "-o", tmp_path / "mlx")
    assert status == 0, stderr
    config = json.loads((tmp_path / "mlx" / "config.json").read_text())
    assert config["model_type"] == "gemma4_text" and "vision_config" not in config


def test_bad_mmproj_is_one_clear_error(e2b_files, tmp_path):
    _, model_gguf, mmproj = e2b_files
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(mmproj.read_bytes()[: mmproj.stat().st_size // 2])
    other = save_reference(VARIANTS["31b"](), tmp_path / "31b")  # no media tokens in its vocabulary
    other_gguf = tmp_path / "31b.gguf"
    write_gguf(other, other_gguf, T.Q8_0)
    gemma3 = tmp_path / "gemma3-mmproj.gguf"  # another model's towers
    writer = GGUFWriter(gemma3, "clip")
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type("gemma3")
    finish(writer)
    mixed = tmp_path / "mixed-mmproj.gguf"  # the 12B's vision beside another model's audio
    writer = GGUFWriter(mixed, "clip")
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_vision_projector_type("gemma4uv")
    writer.add_clip_has_audio_encoder(True)
    writer.add_clip_audio_projector_type("gemma4a")
    finish(writer)
    cases = [
        (model_gguf, tmp_path / "missing.gguf", "missing.gguf: no such file"),
        (model_gguf, gemma3, "'gemma3' is not Gemma 4's ('gemma4v', or 'gemma4uv' for the 12B)"),
        (model_gguf, mixed, "are of two different models"),
        (model_gguf, truncated, "truncated.gguf: not a readable GGUF"),
        (model_gguf, model_gguf, "not an mmproj file"),
        (other_gguf, mmproj, "belongs to another model"),
    ]
    for i, (source, projector, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        status, stderr = run_converter(source, "--mmproj", projector, "-o", out)
        assert status == 2 and message in stderr and len(stderr.splitlines()) == 1, stderr
        assert not out.exists() and not staging_leftovers(tmp_path)


def test_mmproj_with_a_safetensors_source_is_refused(tmp_path, e2b_files):
    from convert_sources import tiny_safetensors

    _, _, mmproj = e2b_files
    status, stderr = run_converter(
        tiny_safetensors(tmp_path / "st"), "--mmproj", mmproj, "-o", tmp_path / "out"
    )
    assert status == 2 and "only for a GGUF source" in stderr


def test_load_and_command_line_take_the_mmproj(e2b_files, tmp_path, monkeypatch, capsys):
    """`gemma_mlx.load(model.gguf, mmproj=...)` and `--mmproj` convert once into the cache and
    give the multimodal model; an mmproj beside a model directory is refused."""
    import gemma_mlx
    from gemma_mlx import hub
    from gemma_mlx.cli import run
    from gemma_mlx.generate import generate
    from gemma_mlx.models.gemma4_multimodal import Model

    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "cache"))
    _, model_gguf, mmproj = e2b_files
    model, tokenizer = gemma_mlx.load(model_gguf, mmproj=mmproj)
    assert isinstance(model, Model)
    assert hub.resolve_model(model_gguf, mmproj) == hub.resolve_model(model_gguf, mmproj)
    image = write_image(tmp_path / "cat.png")
    options = ["-p", "Describe", "-m", "4", "--max-soft-tokens", "70", "--no-chat-template"]
    assert (
        run(["--model", str(model_gguf), "--mmproj", str(mmproj), "--image", str(image), *options])
        == 0
    )
    expected = generate(
        model, tokenizer, "Describe", images=[image], max_tokens=4, max_soft_tokens=70
    )
    assert capsys.readouterr().out.strip() == expected.strip()

    directory = hub.resolve_model(model_gguf, mmproj)
    assert run(["--model", str(directory), "--mmproj", str(mmproj), "-p", "hi"]) == 2
    assert "goes with a .gguf model file" in capsys.readouterr().err
