"""ComfyUI prompt syntax, chunking of long prompts, emphasis arithmetic, textual inversion."""

from __future__ import annotations

import pytest
import torch

from kiln.nodes.conditioning import encode_prompt
from kiln.nodes.loaders import load_checkpoint_handles
from kiln.nodes.sd.prompt import parse_weights


@pytest.fixture(scope="module")
def clip(world):
    from kiln.nodes.sd.manager import get_manager  # noqa: F401  (process default manager is fine here)

    return load_checkpoint_handles(world.ckpt, "tiny").clip


def _w(text):
    return [(t, round(w, 6)) for t, w in parse_weights(text)]


def test_weight_syntax():
    assert _w("a (red:1.5) circle") == [("a ", 1.0), ("red", 1.5), (" circle", 1.0)]
    assert _w("(red)") == [("red", 1.1)]
    assert _w("((red))") == [("red", 1.21)]
    assert _w("[red]") == [("red", round(1 / 1.1, 6))]
    assert _w("(a (b:2):0.5)") == [("a ", 0.5), ("b", 1.0)]
    assert _w("(a:1.2)(b:.5)") == [("a", 1.2), ("b", 0.5)]


def test_escaped_brackets_are_literal():
    assert _w(r"\(not weighted\) and \[this\]") == [("(not weighted) and [this]", 1.0)]
    assert _w(r"(smile \(happy\):1.3)") == [("smile (happy)", 1.3)]


def test_colon_without_number_is_text():
    assert _w("(time: noon)") == [("time: noon", 1.1)]


def test_emphasis_moves_tokens_away_from_the_empty_prompt(clip):
    plain = encode_prompt(clip, "red circle")[0][0]
    strong = encode_prompt(clip, "(red circle:1.5)")[0][0]
    empty = encode_prompt(clip, "")[0][0]
    # every position of a fully weighted prompt (start/end/padding are weight 1) follows z_e + w (z - z_e)
    n_tok = len(clip.tokenizers[0]("red circle", add_special_tokens=False).input_ids)
    body = slice(1, 1 + n_tok)
    expect = empty[:, body] + 1.5 * (plain[:, body] - empty[:, body])
    assert torch.allclose(strong[:, body], expect, atol=1e-5)
    assert torch.allclose(strong[:, 1 + n_tok :], plain[:, 1 + n_tok :], atol=1e-6)
    assert not torch.allclose(strong, plain)


def test_weight_one_is_identical_to_no_brackets(clip):
    assert torch.equal(encode_prompt(clip, "(red:1.0) circle")[0][0], encode_prompt(clip, "red circle")[0][0])


def test_long_prompts_are_chunked_not_truncated(clip):
    short = encode_prompt(clip, "a red circle")[0][0]
    assert short.shape == (1, 77, 32)
    words = " ".join(["red circle blue square"] * 30)
    long = encode_prompt(clip, words)[0][0]
    n = len(clip.tokenizers[0](words, add_special_tokens=False).input_ids)
    assert long.shape == (1, 77 * ((n + 74) // 75), 32) and long.shape[1] > 77
    tail = encode_prompt(clip, words + " green triangle")[0][0]
    assert not torch.equal(tail[:, -77:], long[:, -77:])  # words past token 77 still change the conditioning


def test_empty_prompt_encodes_to_one_chunk(clip):
    c = encode_prompt(clip, "")
    assert c[0][0].shape == (1, 77, 32) and c[0][1]["pooled_output"].shape[0] == 1


def test_clip_set_last_layer_changes_the_encoding(clip):
    a = encode_prompt(clip, "red circle")[0][0]
    b = encode_prompt(clip.with_layer(-2), "red circle")[0][0]
    assert a.shape == b.shape and not torch.allclose(a, b)


def test_textual_inversion_embedding(world, clip):
    from safetensors.torch import save_file

    from kiln import engine

    emb_dir = world.models / "embeddings"
    emb_dir.mkdir(exist_ok=True)
    vecs = torch.randn(2, 32, generator=torch.Generator().manual_seed(3))
    save_file({"emb_params": vecs}, str(emb_dir / "shiny.safetensors"))
    with engine.use_folders(engine.Folders(world.base)):
        with_emb = encode_prompt(clip, "a embedding:shiny circle")[0][0]
        without = encode_prompt(clip, "a circle")[0][0]
        from kiln.nodes.sd.prompt import PromptError

        with pytest.raises(PromptError, match="not found"):
            encode_prompt(clip, "embedding:missing")
        save_file({"emb_params": torch.randn(1, 768)}, str(emb_dir / "sd15only.safetensors"))
        with pytest.raises(PromptError, match="size 32"):
            encode_prompt(clip, "embedding:sd15only")
    assert not torch.allclose(with_emb, without)
    # the file's vectors take the place of the word, between "a" and "circle"
    from kiln.nodes.sd.prompt import tokenize

    toks = tokenize("a embedding:shiny circle", clip.tokenizers[0], lambda name: vecs)
    assert [t.vector is not None for t in toks] == [False, True, True, False]
    assert torch.equal(toks[1].vector, vecs[0]) and torch.equal(toks[2].vector, vecs[1])


def test_missing_embedding_is_a_node_error(world):
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "embedding:nothere", "clip": ["1", 1]}},
    }
    res = world.run(g, ["2"])
    assert res.status == "error" and "nothere" in res.error.message
