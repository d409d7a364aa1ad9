"""Images and audio through every interface: `gemma_mlx.load` with the towers, `stream_generate`
(content parts, `images=`/`audio=`, drafting), `ChatSession` (no re-encoding, saved sessions) and
the command line, on a tiny E2B-shaped chat model written by transformers.

The reference for generation is the model itself without any of the machinery under test: the
whole prompt and every generated token run through one uncached forward pass per step, with the
soft tokens placed by `PromptMedia` (whose parity with transformers is `test_multimodal_parity`)."""

from __future__ import annotations

import subprocess
import sys

import mlx.core as mx
import pytest
from multimodal_chat_model import write_audio, write_image, write_multimodal_model
from PIL import Image
from tiny_chat_model import write_model

import gemma_mlx
from gemma_mlx.chat import ChatSession
from gemma_mlx.cli import run
from gemma_mlx.errors import MediaError, OptionError
from gemma_mlx.fingerprint import model_fingerprint
from gemma_mlx.generate import generate, prepare_prompt, stream_generate

SOFT = 70  # the smallest image budget: at most 70 soft tokens


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("mm-generate")
    return {
        "model": write_multimodal_model(root / "tiny-mm-it"),
        "text_model": write_model(root / "tiny-text-it"),
        "image": write_image(root / "cat.png"),
        "other_image": write_image(root / "dog.png", 30, 45, seed=1),
        "audio": write_audio(root / "clip.wav", 0.6, 22_050),
    }


@pytest.fixture(scope="module")
def loaded(files):
    return gemma_mlx.load(files["model"])


def user(*parts, text="describe this"):
    content = [{"type": kind, kind: source} for kind, source in parts]
    return {"role": "user", "content": [*content, {"type": "text", "text": text}]}


def reference_greedy(model, prompt, got: list[int]) -> list[int]:
    """The greedy choice after the prepared prompt followed by each prefix of `got`, from one
    uncached forward pass over the prompt and `got` (equal to `got` exactly when `got` is the
    model's greedy continuation)."""
    logits = model(mx.array([[*prompt.tokens, *got[:-1]]]), media=prompt.media)[0]
    return mx.argmax(logits[len(prompt.tokens) - 1 :], axis=-1).tolist()


def tokens_of(model, tokenizer, prompt, **options) -> list[int]:
    return [r.token for r in stream_generate(model, tokenizer, prompt, **options)]


def test_load_takes_the_towers_when_present(files, loaded):
    model, _ = loaded
    assert model.media_args.vision is not None and model.media_args.audio is not None
    text_only, _ = gemma_mlx.load(files["model"], media=False)
    assert getattr(text_only, "media_args", None) is None
    assert not any(k.startswith(("vision_tower", "audio_tower")) for k in text_only)
    # Same checkpoint, same identity (saved sessions move between the two).
    assert model_fingerprint(text_only) == model_fingerprint(model)
    with pytest.raises(MediaError, match="no vision or audio tower"):
        gemma_mlx.load(files["text_model"], media=True)


def test_a_text_only_export_with_a_multimodal_config_loads_as_text(files, tmp_path):
    """config.json describes towers, the weights hold none: `media=None` loads the text model."""
    import shutil

    from safetensors.numpy import load_file, save_file

    copy = tmp_path / "text-export"
    shutil.copytree(files["model"], copy)
    weights = load_file(copy / "model.safetensors")
    text = {k: v for k, v in weights.items() if ".language_model." in k}
    assert len(text) < len(weights)
    save_file(text, copy / "model.safetensors", metadata={"format": "pt"})
    model, _ = gemma_mlx.load(copy)
    assert getattr(model, "media_args", None) is None
    with pytest.raises(MediaError, match="describes vision/audio towers but the weights hold none"):
        gemma_mlx.load(copy, media=True)


def test_a_directory_in_our_own_names_loads_the_same_model(files, loaded, tmp_path):
    """What a converter writing the towers would produce: our module names (sanitize is
    idempotent), the checkpoint's nested config.json. Same weights, same soft tokens."""
    import shutil

    from mlx.utils import tree_flatten

    model, tokenizer = loaded
    copy = tmp_path / "ours-it"
    copy.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(files["model"] / name, copy / name)
    mx.save_safetensors(str(copy / "model.safetensors"), dict(tree_flatten(model.parameters())))
    again, _ = gemma_mlx.load(copy)
    assert model_fingerprint(again) == model_fingerprint(model)
    messages = [user(("image", files["image"]), ("audio", files["audio"]))]
    prompts = [prepare_prompt(m, tokenizer, messages, max_soft_tokens=SOFT) for m in (model, again)]
    assert mx.array_equal(prompts[0].media.embeddings, prompts[1].media.embeddings)


def test_stream_generate_with_media_matches_the_uncached_model(files, loaded):
    model, tokenizer = loaded
    kinds = ("image", "audio")
    messages = [user(*[(kind, files[kind]) for kind in kinds])]
    prompt = prepare_prompt(model, tokenizer, messages, max_soft_tokens=SOFT)
    assert [item.kind for item in prompt.media.items] == list(kinds)
    # Chunks of 16 tokens: the image (and the clip) span several chunk boundaries.
    got = tokens_of(
        model, tokenizer, messages, max_tokens=10, max_soft_tokens=SOFT, prefill_step_size=16
    )
    assert len(got) == 10 and got == reference_greedy(model, prompt, got)
    # The soft tokens reach the logits: the same image upside down, same tokens, other logits.
    flipped = Image.open(files["image"]).transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    other = prepare_prompt(
        model, tokenizer, [user(("image", flipped), ("audio", files["audio"]))],
        max_soft_tokens=SOFT,
    )  # fmt: skip
    assert other.tokens == prompt.tokens and other.media.items != prompt.media.items
    last = [model(mx.array([p.tokens]), media=p.media)[0, -1] for p in (prompt, other)]
    assert mx.abs(last[0] - last[1]).max().item() > 1e-3


def test_text_prompt_takes_images_at_its_start(files, loaded):
    model, tokenizer = loaded
    ids = {name: tokenizer.token_to_id(name) for name in ("<bos>", "<|image>", "<|image|>")}
    prompt = prepare_prompt(
        model, tokenizer, "describe", images=files["image"], max_soft_tokens=SOFT
    )
    n = prompt.media.items[0].end - prompt.media.items[0].begin
    assert prompt.tokens[:3] == [ids["<bos>"], ids["<|image>"], ids["<|image|>"]]
    assert prompt.tokens[2 : 2 + n] == [ids["<|image|>"]] * n
    assert prompt.tokens[2 + n + 1 :] == tokenizer.encode("describe")[1:]
    got = tokens_of(model, tokenizer, "describe", images=[files["image"]], max_tokens=6,
                    max_soft_tokens=SOFT)  # fmt: skip
    assert len(got) == 6 and got == reference_greedy(model, prompt, got)


def test_images_given_apart_go_with_the_last_user_message(files, loaded):
    model, tokenizer = loaded
    messages = [{"role": "user", "content": "describe this"}]
    apart = prepare_prompt(model, tokenizer, messages, images=files["image"], max_soft_tokens=SOFT)
    parts = prepare_prompt(
        model, tokenizer, [user(("image", files["image"]))], max_soft_tokens=SOFT
    )
    assert apart.tokens == parts.tokens
    assert apart.media.items == parts.media.items


def test_drafting_with_media_gives_the_same_tokens(files, loaded):
    model, tokenizer = loaded
    messages = [user(("image", files["image"]))]
    plain = tokens_of(model, tokenizer, messages, max_tokens=12, max_soft_tokens=SOFT)
    drafted = tokens_of(
        model, tokenizer, messages, max_tokens=12, max_soft_tokens=SOFT, draft="prompt-lookup",
        num_draft=3,
    )  # fmt: skip
    assert drafted == plain


def test_media_errors_come_before_any_work(files, loaded, tmp_path):
    model, tokenizer = loaded
    text_model, text_tokenizer = gemma_mlx.load(files["text_model"])
    with pytest.raises(MediaError, match="without vision and audio towers"):
        next(stream_generate(text_model, text_tokenizer, "hi", images=[files["image"]]))
    broken = tmp_path / "broken.png"
    broken.write_bytes(files["image"].read_bytes()[:60])
    cache = model.make_cache()
    with pytest.raises(MediaError, match=r"broken\.png"):
        next(stream_generate(model, tokenizer, [user(("image", files["image"]), ("image", broken))],
                             prompt_cache=cache, max_soft_tokens=SOFT))  # fmt: skip
    assert cache[0].offset == 0  # nothing prefilled
    with pytest.raises(OptionError, match="not both"):
        next(stream_generate(model, tokenizer, [user(("image", files["image"]))],
                             images=[files["image"]]))  # fmt: skip
    with pytest.raises(OptionError, match="max_soft_tokens"):
        next(stream_generate(model, tokenizer, "hi", max_soft_tokens=100))
    with pytest.raises(MediaError, match="1 image placeholder"):  # a placeholder without its image
        next(stream_generate(model, tokenizer, "<|image|> hi"))


class EncodeCounter:
    """Counts the model's image and audio encodings."""

    def __init__(self, model):
        self.calls = 0
        for name in ("encode_image", "encode_audio"):
            original = getattr(model, name)

            def counted(*args, _original=original):
                self.calls += 1
                return _original(*args)

            setattr(model, name, counted)


def test_chat_session_keeps_media_in_its_cache(files, loaded, tmp_path):
    model, tokenizer = loaded
    counter = EncodeCounter(model)
    session = ChatSession(model, tokenizer, max_tokens=6, max_soft_tokens=SOFT)
    first = session.send("what is this", images=[files["image"]], audio=files["audio"])
    assert counter.calls == 2
    path = tmp_path / "session.safetensors"
    session.save(path)

    responses = list(session.stream("and now?"))
    assert counter.calls == 2  # nothing re-encoded
    # Only the new turn was prefilled, yet the reply is that of a fresh run over the whole
    # conversation (files given again).
    history = [
        user(("image", files["image"]), ("audio", files["audio"]), text="what is this"),
        {"role": "assistant", "content": first},
        {"role": "user", "content": "and now?"},
    ]
    fresh = tokens_of(model, tokenizer, history, max_tokens=6, max_soft_tokens=SOFT)
    assert [r.token for r in responses] == fresh
    full = len(prepare_prompt(model, tokenizer, history, max_soft_tokens=SOFT).tokens)
    assert responses[0].prompt_tokens < full - 70

    # The saved session holds the soft tokens: it continues identically, encoding nothing.
    counter.calls = 0  # the fresh runs above encoded the files again
    restored = ChatSession.load(path, model, tokenizer, max_tokens=6, max_soft_tokens=SOFT)
    assert [r.token for r in restored.stream("and now?")] == fresh
    assert counter.calls == 0
    # A new image in a later turn is encoded once, and only it.
    session.send("and this one?", images=files["other_image"])
    assert counter.calls == 1


def test_chat_session_does_not_reuse_another_images_cache(files, loaded):
    """Two images with the same placeholder count: the cache of the first is not kept."""
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, max_tokens=4, max_soft_tokens=SOFT)
    session.send("look", images=[files["image"]])
    session.messages, kept = [], list(session.tokens)
    other = Image.open(files["image"]).transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    got = [r.token for r in session.stream("look", images=[other])]
    prompt = prepare_prompt(model, tokenizer, [user(("image", other), text="look")],
                            max_soft_tokens=SOFT)  # fmt: skip
    assert prompt.tokens[: len(kept) - 4] == kept[: len(kept) - 4]  # same tokens, other image
    assert len(got) == 4 and got == reference_greedy(model, prompt, got)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gemma_mlx.generate", *args],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.parametrize("kind", ["image", "audio"])
def test_command_line_with_media(files, loaded, kind):
    model, tokenizer = loaded
    done = cli("--model", str(files["model"]), f"--{kind}", str(files[kind]), "-p", "Describe",
               "-m", "5", "--max-soft-tokens", str(SOFT))  # fmt: skip
    assert done.returncode == 0, done.stderr
    expected = generate(model, tokenizer, [user((kind, files[kind]), text="Describe")],
                        max_tokens=5, max_soft_tokens=SOFT)  # fmt: skip
    assert done.stdout.strip() == expected.strip()
    assert "Prompt:" in done.stderr


def _png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims `width` x `height` pixels (a decompression bomb's header)."""
    import io
    import struct
    import zlib

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_command_line_media_errors_are_one_line(files, tmp_path, capsys):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_claiming(30_000, 30_000))
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    text = tmp_path / "notes.wav"
    text.write_text("not audio")
    long_clip = write_audio(tmp_path / "long.wav", 31.0, 8_000)
    cases = [
        (["--image", str(bomb)], "bomb.png: too many pixels"),
        (["--image", str(corrupt)], "corrupt.jpg"),
        (["--image", str(tmp_path / "missing.png")], "missing.png: no such file"),
        (["--audio", str(text)], "notes.wav: not audio"),
        (["--audio", str(long_clip)], "long.wav: 31.0 s is longer than the 30 s allowed"),
        (["--model", str(files["text_model"]), "--image", str(files["image"])],
         "no vision or audio tower"),
    ]  # fmt: skip
    for extra, message in cases:
        if "--model" not in extra:  # media are checked before the model is loaded: none needed
            extra = ["--model", str(tmp_path / "no-such-model"), *extra]
        assert run([*extra, "-p", "hi"]) == 2, extra
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("gemma-mlx: error: "), err
        assert message in err, err


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_session_with_media_saves_and_continues(files, tmp_path, dtype):
    """What a Mac computes: soft tokens and caches in half precision survive a saved session
    bit for bit (the continuation equals the unsaved session's)."""
    model, tokenizer = gemma_mlx.load(files["model"], dtype=dtype)
    session = ChatSession(model, tokenizer, max_tokens=4, max_soft_tokens=SOFT)
    session.send("what is this", images=files["image"])
    (encoded,) = session.encoded.values()
    assert encoded.dtype == getattr(mx, dtype)
    path = tmp_path / "half.safetensors"
    session.save(path)
    restored = ChatSession.load(path, model, tokenizer, max_tokens=4, max_soft_tokens=SOFT)
    assert mx.array_equal(next(iter(restored.encoded.values())), encoded)
    assert restored.send("and?") == session.send("and?")
