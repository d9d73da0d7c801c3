"""Local-file reward adapters (epd_core.rl.rewards.LocalModelReward) on TINY random models built offline here:
a transformers CLIP (hidden 32, 1 layer, 32x32 images, projection 16) with a handwritten byte-level BPE tokenizer,
a LAION-style aesthetic head on top of it, and (if open_clip is installed) a tiny open_clip model for HPSv2."""
import importlib.util
import json

import pytest
import torch

from epd_core.rl import rewards
from epd_core.rl.rewards import LocalModelReward, RewardUnavailableError


def _bytes_to_unicode():
    """CLIP's byte -> printable unicode table (every byte gets a one-character token)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _write_tiny_clip(folder, seed=0):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    merges = ["c a", "ca t</w>", "d o", "do g</w>", "r e", "re d</w>"]
    for m in merges:
        vocab[m.replace(" ", "")] = len(vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    folder.mkdir(parents=True)
    (folder.parent / "vocab.json").write_text(json.dumps(vocab))
    (folder.parent / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(vocab=str(folder.parent / "vocab.json"), merges=str(folder.parent / "merges.txt"),
                        model_max_length=16)
    image_proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    eos = vocab["<|endoftext|>"]
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=eos, pad_token_id=eos),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(seed)
    CLIPModel(cfg).save_pretrained(str(folder))
    CLIPProcessor(image_processor=image_proc, tokenizer=tok).save_pretrained(str(folder))
    return folder


def _aesthetic_head(in_dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, (o, n) in zip(rewards.AESTHETIC_LAYERS, [(1024, in_dim), (128, 1024), (64, 128), (16, 64), (1, 16)]):
        sd[f"layers.{i}.weight"] = torch.randn(o, n, generator=g) / n ** 0.5
        sd[f"layers.{i}.bias"] = torch.randn(o, generator=g) * 0.1
    return sd


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("rewards")
    clip = _write_tiny_clip(root / "tok" / "clip")
    aest = root / "aesthetic"
    _write_tiny_clip(aest / "clip", seed=1)
    torch.save(_aesthetic_head(), aest / "sac+logos+ava1-l14-linearMSE.pth")
    return {"root": root, "clip": clip, "aesthetic": aest}


def _images(b=3, h=40, w=48, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _check_scorer(reward, prompts, with_prompts=True):
    x = _images(len(prompts))
    s = reward(x, prompts)
    assert s.shape == (len(prompts),) and s.dtype == torch.float32 and torch.isfinite(s).all()
    assert torch.equal(s, reward(x, prompts))  # deterministic
    assert not torch.allclose(s, reward(_images(len(prompts), seed=1), prompts))  # other images, other scores
    s64 = reward(_images(len(prompts), 64, 64, seed=2), prompts)  # any size: the preprocessing resizes
    assert s64.shape == (len(prompts),) and torch.isfinite(s64).all()
    if with_prompts:
        assert not torch.allclose(s, reward(x, list(reversed(prompts))))
    return s


@pytest.mark.parametrize("kind", ["clip", "pickscore"])
def test_clip_family_scores_from_local_folder(tiny, kind):
    _check_scorer(LocalModelReward(kind, tiny["clip"]), ["a cat", "a red dog " * 20, "dog"])  # long: truncated


def test_clip_score_matches_manual_computation(tiny):
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer
    model = CLIPModel.from_pretrained(str(tiny["clip"])).eval()
    x, prompts = _images(2), ["a cat", "a dog"]
    pix = CLIPImageProcessor.from_pretrained(str(tiny["clip"]))(images=list(x), do_rescale=False,
                                                                 return_tensors="pt")["pixel_values"]
    assert pix.shape == (2, 3, 32, 32) and pix.min() < -1 and pix.max() > 1  # [0, 1] normalised, not /255 again
    ids = CLIPTokenizer.from_pretrained(str(tiny["clip"]))(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(pixel_values=pix, **ids)
    img = torch.nn.functional.normalize(out.image_embeds, dim=-1)
    txt = torch.nn.functional.normalize(out.text_embeds, dim=-1)
    expected = model.logit_scale.exp() * (img * txt).sum(-1)
    torch.testing.assert_close(LocalModelReward("clip", tiny["clip"])(x, prompts), expected)


def test_aesthetic_head_on_tiny_clip(tiny):
    folder = tiny["aesthetic"]
    reward = LocalModelReward("aesthetic", folder)
    s = _check_scorer(reward, ["a", "b", "c"], with_prompts=False)
    assert torch.equal(s, reward(_images(3), ["x", "y", "z"]))  # prompts are ignored
    # the head file itself (with clip/ beside it) works too and gives the same scores
    by_file = LocalModelReward("aesthetic", folder / "sac+logos+ava1-l14-linearMSE.pth")
    assert torch.equal(by_file(_images(3), ["a"] * 3), s)
    # matches the LAION recipe: MLP(L2-normalised CLIP image embedding)
    from transformers import CLIPImageProcessor, CLIPModel
    clip = CLIPModel.from_pretrained(str(folder / "clip")).eval()
    pix = CLIPImageProcessor.from_pretrained(str(folder / "clip"))(images=list(_images(3)), do_rescale=False,
                                                                   return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        emb = clip.visual_projection(clip.vision_model(pixel_values=pix).pooler_output)
        h = emb / emb.norm(dim=-1, keepdim=True)
        sd = _aesthetic_head()
        for i in rewards.AESTHETIC_LAYERS:
            h = h @ sd[f"layers.{i}.weight"].T + sd[f"layers.{i}.bias"]
    torch.testing.assert_close(s, h.squeeze(-1))


def test_aesthetic_safetensors_head(tiny, tmp_path):
    from safetensors.torch import save_file
    (tmp_path / "clip").symlink_to(tiny["aesthetic"] / "clip")
    save_file(_aesthetic_head(), str(tmp_path / "aesthetic.safetensors"))
    ref = LocalModelReward("aesthetic", tiny["aesthetic"])(_images(2), ["", ""])
    torch.testing.assert_close(LocalModelReward("aesthetic", tmp_path)(_images(2), ["", ""]), ref)


def test_aesthetic_bad_files_give_clear_errors(tiny, tmp_path):
    clip = tiny["aesthetic"] / "clip"

    def case(name, head):
        d = tmp_path / name
        d.mkdir()
        (d / "clip").symlink_to(clip)
        if head is not None:
            torch.save(head, d / "head.pth")
        return d

    sd = _aesthetic_head()
    with pytest.raises(RewardUnavailableError, match=r"head\.pth.*layers\.7\.weight"):
        LocalModelReward("aesthetic", case("wrong_keys", {k: v for k, v in sd.items() if "7" not in k}))
    with pytest.raises(RewardUnavailableError, match=r"embeds to 16"):
        LocalModelReward("aesthetic", case("wrong_width", _aesthetic_head(in_dim=768)))
    with pytest.raises(RewardUnavailableError, match=r"never pickled objects"):  # a pickled module is refused
        LocalModelReward("aesthetic", case("pickled", torch.nn.Linear(2, 2)))
    bad = case("corrupt", None)
    (bad / "head.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(RewardUnavailableError, match=r"head\.pth"):
        LocalModelReward("aesthetic", bad)
    with pytest.raises(RewardUnavailableError, match=r"exactly one weight file"):
        LocalModelReward("aesthetic", case("no_head", None))
    lone = tmp_path / "lone"
    lone.mkdir()
    torch.save(sd, lone / "head.pth")
    with pytest.raises(RewardUnavailableError, match=r"CLIP ViT-L/14 folder.*epd_rewards"):
        LocalModelReward("aesthetic", lone / "head.pth")


def test_clip_corrupted_or_missing_files_give_clear_errors(tiny, tmp_path):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(tiny["clip"], broken)
    (broken / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(RewardUnavailableError, match=r"cannot load the 'pickscore' model .*epd_rewards"):
        LocalModelReward("pickscore", broken)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RewardUnavailableError, match=r"cannot load the 'clip' model"):
        LocalModelReward("clip", tmp_path / "empty")
    with pytest.raises(RewardUnavailableError, match=r"not found .*epd_rewards"):
        LocalModelReward("clip", tmp_path / "missing")
    with pytest.raises(RewardUnavailableError, match=r"RGB images"):
        LocalModelReward("clip", tiny["clip"])(torch.rand(2, 4, 8, 8), ["a", "b"])


def test_imagereward_and_missing_package_messages(tmp_path, monkeypatch):
    (tmp_path / "ImageReward.pt").write_bytes(b"")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("open_clip", "ImageReward")
                        else real(name, *a))
    with pytest.raises(RewardUnavailableError, match="pip install open_clip_torch"):
        LocalModelReward("hpsv2", tmp_path / "ImageReward.pt")
    with pytest.raises(RewardUnavailableError, match="pip install image-reward"):
        LocalModelReward("imagereward", tmp_path / "ImageReward.pt")
    monkeypatch.setattr(importlib.util, "find_spec", real)
    with pytest.raises(RewardUnavailableError, match="not implemented"):
        rewards._load_backend("imagereward", tmp_path, "cpu")


# ------------------------------------------------------------------------------------------------- HPSv2

TINY_OPEN_CLIP = "EPD-Tiny-Test-ViT"


@pytest.fixture(scope="module")
def tiny_hps(tmp_path_factory):
    open_clip = pytest.importorskip("open_clip")
    root = tmp_path_factory.mktemp("hps")
    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (root / f"{TINY_OPEN_CLIP}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(root / f"{TINY_OPEN_CLIP}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_OPEN_CLIP, pretrained=None)
    torch.save({"state_dict": model.state_dict()}, root / "HPS_v2.1_compressed.pt")
    return root


def test_hpsv2_on_tiny_open_clip(tiny_hps, monkeypatch):
    import open_clip
    monkeypatch.setattr(rewards, "HPSV2_ARCH", TINY_OPEN_CLIP)
    reward = LocalModelReward("hpsv2", tiny_hps / "HPS_v2.1_compressed.pt")
    prompts = ["a photo of a cat", "a red dog", "an astronaut riding a horse"]
    s = _check_scorer(reward, prompts)
    assert (s.abs() <= 100).all()
    assert torch.equal(LocalModelReward("hpsv2", tiny_hps)(_images(3), prompts), s)  # the folder works too
    # HPSv2's recipe: 100 * <normalised image features, normalised text features>
    model = open_clip.create_model(TINY_OPEN_CLIP, pretrained=None)
    model.load_state_dict(torch.load(tiny_hps / "HPS_v2.1_compressed.pt", weights_only=True)["state_dict"])
    model.eval()
    x = torch.nn.functional.interpolate(_images(3), size=(32, 38), mode="bicubic", antialias=True).clamp(0, 1)
    x = x[..., 3:35]
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        img = model.encode_image((x - mean) / std, normalize=True)
        txt = model.encode_text(open_clip.get_tokenizer(TINY_OPEN_CLIP)(prompts), normalize=True)
    torch.testing.assert_close(s, 100 * (img * txt).sum(-1))


def test_hpsv2_wrong_checkpoint_gives_clear_error(tiny_hps, tmp_path, monkeypatch):
    monkeypatch.setattr(rewards, "HPSV2_ARCH", TINY_OPEN_CLIP)
    torch.save({"state_dict": {"visual.proj": torch.zeros(2)}}, tmp_path / "other.pt")
    with pytest.raises(RewardUnavailableError, match=r"(?s)other\.pt does not match .*size mismatch"):
        LocalModelReward("hpsv2", tmp_path / "other.pt")
    sd = torch.load(tiny_hps / "HPS_v2.1_compressed.pt", weights_only=True)["state_dict"]
    torch.save({k: v for k, v in sd.items() if not k.startswith("visual.")}, tmp_path / "partial.pt")
    with pytest.raises(RewardUnavailableError, match=r"partial\.pt does not match .*missing keys"):
        LocalModelReward("hpsv2", tmp_path / "partial.pt")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "pickled.pt")
    with pytest.raises(RewardUnavailableError, match=r"never pickled objects"):
        LocalModelReward("hpsv2", tmp_path / "pickled.pt")
