"""Local-file reward adapters (epd_core.training.rl.rewards.LocalModelReward) on TINY random models built offline here:
a transformers CLIP (hidden 32, 1 layer, 32x32 images, projection 16) with a handwritten byte-level BPE tokenizer,
a LAION-style aesthetic head on top of it, (if open_clip is installed) a tiny open_clip model for HPSv2, and a tiny
ImageReward-shaped BLIP state dict (real key names) checked against a hand-written forward pass."""
import importlib.util
import json
import resource

import pytest
import torch

from epd_core.training.rl import rewards
from epd_core.training.rl.rewards import LocalModelReward, RewardUnavailableError


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
    for i, (o, n) in zip(rewards.HEAD_LINEARS, [(1024, in_dim), (128, 1024), (64, 128), (16, 64), (1, 16)]):
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
        for i in rewards.HEAD_LINEARS:
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


def test_missing_package_messages(tmp_path, monkeypatch):
    (tmp_path / "ImageReward.pt").write_bytes(b"")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("open_clip", "timm")
                        else real(name, *a))
    with pytest.raises(RewardUnavailableError, match="pip install open_clip_torch"):
        LocalModelReward("hpsv2", tmp_path / "ImageReward.pt")
    with pytest.raises(RewardUnavailableError, match=r"needs the Python package\(s\) timm.*pip install timm"):
        LocalModelReward("imagereward", tmp_path / "ImageReward.pt")
    monkeypatch.setattr(importlib.util, "find_spec", real)
    with pytest.raises(RewardUnavailableError, match="not implemented"):
        rewards._load_backend("no-such-kind", tmp_path, "cpu")


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


# ------------------------------------------------------------------------------------------------ ImageReward

IR_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "cat", "dog", "red", "photo", "of", "the", "."]
IR_V, IR_T = 32, 32  # vision width (1 head at VISION_HEAD_DIM 64), text hidden (2 heads from med_config.json)


def _imagereward_state_dict(seed=0, v_depth=2, t_layers=2, grid=2, patch=16, positions=40, inter=48):
    """A tiny random ImageReward.pt state dict with the real key names (BLIP ViT + BLIP BERT + MLP head)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def lin(name, o, i):
        sd[name + ".weight"] = torch.randn(o, i, generator=g) / i ** 0.5
        sd[name + ".bias"] = torch.randn(o, generator=g) * 0.1

    def ln(name, d):
        sd[name + ".weight"] = 1 + 0.1 * torch.randn(d, generator=g)
        sd[name + ".bias"] = 0.1 * torch.randn(d, generator=g)

    v = "blip.visual_encoder."
    sd[v + "cls_token"] = torch.randn(1, 1, IR_V, generator=g) * 0.5
    sd[v + "pos_embed"] = torch.randn(1, grid * grid + 1, IR_V, generator=g) * 0.5
    sd[v + "patch_embed.proj.weight"] = torch.randn(IR_V, 3, patch, patch, generator=g) / (3 * patch * patch) ** 0.5
    sd[v + "patch_embed.proj.bias"] = torch.randn(IR_V, generator=g) * 0.1
    for n in range(v_depth):
        b = f"{v}blocks.{n}."
        ln(b + "norm1", IR_V)
        lin(b + "attn.qkv", 3 * IR_V, IR_V)
        lin(b + "attn.proj", IR_V, IR_V)
        ln(b + "norm2", IR_V)
        lin(b + "mlp.fc1", 2 * IR_V, IR_V)
        lin(b + "mlp.fc2", IR_V, 2 * IR_V)
    ln(v + "norm", IR_V)
    t = "blip.text_encoder."
    sd[t + "embeddings.word_embeddings.weight"] = torch.randn(len(IR_VOCAB) + 2, IR_T, generator=g)
    sd[t + "embeddings.position_embeddings.weight"] = torch.randn(positions, IR_T, generator=g) * 0.5
    sd[t + "embeddings.position_ids"] = torch.arange(positions)[None]  # BLIP's persistent buffer
    ln(t + "embeddings.LayerNorm", IR_T)
    for n in range(t_layers):
        b = f"{t}encoder.layer.{n}."
        for att, kv_in in (("attention", IR_T), ("crossattention", IR_V)):
            lin(f"{b}{att}.self.query", IR_T, IR_T)
            lin(f"{b}{att}.self.key", IR_T, kv_in)
            lin(f"{b}{att}.self.value", IR_T, kv_in)
            lin(f"{b}{att}.output.dense", IR_T, IR_T)
            ln(f"{b}{att}.output.LayerNorm", IR_T)
        lin(b + "intermediate.dense", inter, IR_T)
        lin(b + "output.dense", IR_T, inter)
        ln(b + "output.LayerNorm", IR_T)
    lin("blip.vision_proj", 16, IR_V)  # in BLIP_Pretrain, unused by ImageReward.score
    lin("blip.text_proj", 16, IR_T)
    for i, (o, n) in zip(rewards.HEAD_LINEARS, [(1024, IR_T), (128, 1024), (64, 128), (16, 64), (1, 16)]):
        lin(f"mlp.layers.{i}", o, n)
    return sd


def _write_imagereward(folder, sd=None, med=True, vocab=True):
    folder.mkdir(parents=True)
    torch.save(_imagereward_state_dict() if sd is None else sd, folder / "ImageReward.pt")
    if med:
        (folder / "med_config.json").write_text(json.dumps({
            "architectures": ["BertModel"], "hidden_act": "gelu", "hidden_size": IR_T, "intermediate_size": 48,
            "layer_norm_eps": 1e-12, "max_position_embeddings": 40, "model_type": "bert", "num_attention_heads": 2,
            "num_hidden_layers": 2, "pad_token_id": 0, "vocab_size": len(IR_VOCAB) + 2, "encoder_width": 768,
            "add_cross_attention": True}))
    if vocab:
        (folder / "tokenizer").mkdir()
        (folder / "tokenizer" / "vocab.txt").write_text("\n".join(IR_VOCAB) + "\n")
    return folder


def _reference_imagereward(sd, pixels, ids, mask):
    """ImageReward.score's forward written out by hand (BLIP vit.py / med.py semantics, eval mode)."""
    F = torch.nn.functional
    p = {k: v.double() for k, v in sd.items() if v.is_floating_point()}

    def lin(x, name):
        return F.linear(x, p[name + ".weight"], p[name + ".bias"])

    def ln(x, name, eps):
        return F.layer_norm(x, x.shape[-1:], p[name + ".weight"], p[name + ".bias"], eps)

    def attend(q, k, v, heads, key_mask=None):
        b, nq, d = q.shape
        q, k, v = (t.reshape(b, -1, heads, d // heads).transpose(1, 2) for t in (q, k, v))
        a = q @ k.transpose(-1, -2) / (d // heads) ** 0.5
        if key_mask is not None:
            a = a + (1 - key_mask[:, None, None, :].double()) * -10000.0
        return (a.softmax(-1) @ v).transpose(1, 2).reshape(b, nq, d)

    v = "blip.visual_encoder."
    x = F.conv2d(pixels.double(), p[v + "patch_embed.proj.weight"], p[v + "patch_embed.proj.bias"], stride=16)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([p[v + "cls_token"].expand(x.shape[0], -1, -1), x], 1) + p[v + "pos_embed"]
    n = 0
    while f"{v}blocks.{n}.norm1.weight" in p:
        b = f"{v}blocks.{n}."
        qkv = lin(ln(x, b + "norm1", 1e-6), b + "attn.qkv")
        x = x + lin(attend(*qkv.split(IR_V, -1), heads=1), b + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, b + "norm2", 1e-6), b + "mlp.fc1")), b + "mlp.fc2")
        n += 1
    img = ln(x, v + "norm", 1e-6)
    t = "blip.text_encoder."
    h = p[t + "embeddings.word_embeddings.weight"][ids] + p[t + "embeddings.position_embeddings.weight"][:ids.shape[1]]
    h = ln(h, t + "embeddings.LayerNorm", 1e-12)
    n = 0
    while f"{t}encoder.layer.{n}.attention.self.query.weight" in p:
        b = f"{t}encoder.layer.{n}."
        for att, src, m in (("attention", h, mask), ("crossattention", img, None)):
            a = attend(lin(h, f"{b}{att}.self.query"), lin(src, f"{b}{att}.self.key"), lin(src, f"{b}{att}.self.value"),
                       heads=2, key_mask=m)
            h = ln(lin(a, f"{b}{att}.output.dense") + h, f"{b}{att}.output.LayerNorm", 1e-12)
        h = ln(lin(F.gelu(lin(h, b + "intermediate.dense")), b + "output.dense") + h, b + "output.LayerNorm", 1e-12)
        n += 1
    z = h[:, 0]
    for i in rewards.HEAD_LINEARS:  # Dropouts are identities; no activations in ImageReward's MLP
        z = lin(z, f"mlp.layers.{i}")
    return ((z.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072).float()


@pytest.fixture(scope="module")
def tiny_ir(tmp_path_factory):
    return _write_imagereward(tmp_path_factory.mktemp("ir") / "imagereward")


def test_imagereward_on_tiny_checkpoint(tiny_ir):
    reward = LocalModelReward("imagereward", tiny_ir)
    prompts = ["a red cat", "Dog", "a photo of the dog . " * 10]  # the last one is truncated to 35 tokens
    s = _check_scorer(reward, prompts)
    assert torch.equal(LocalModelReward("imagereward", tiny_ir / "ImageReward.pt")(_images(3), prompts), s)
    # hand-written reference: tokens by hand ([CLS] first, as ImageReward.score: no [ENC] swap), padding to 35
    ids = torch.zeros(3, 35, dtype=torch.long)
    ids[0, :5] = torch.tensor([2, 5, 8, 6, 3])
    ids[1, :3] = torch.tensor([2, 7, 3])
    ids[2, 0], ids[2, 1:34], ids[2, 34] = 2, torch.tensor([5, 9, 10, 11, 7, 12] * 6)[:33], 3  # truncated
    mask = (ids != 0).long()
    # BLIP/CLIP preprocessing: bicubic resize of the short side (40 -> 32, 48 -> 38), centre crop, CLIP mean / std
    x = torch.nn.functional.interpolate(_images(3), size=(32, 38), mode="bicubic", antialias=True).clamp(0, 1)
    x = x[..., 3:35]
    x = ((x - torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1))
         / torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1))
    expected = _reference_imagereward(_imagereward_state_dict(), x, ids, mask)
    torch.testing.assert_close(s, expected, rtol=1e-4, atol=1e-4)
    assert expected.std() > 1e-3  # a non-degenerate check


def test_imagereward_without_med_config_uses_blip_defaults(tmp_path, tiny_ir):
    # no med_config.json: heads = hidden // 64 (= 1 here, not the 2 the tiny checkpoint was built for) -> other scores
    folder = _write_imagereward(tmp_path / "ir", med=False)
    s = LocalModelReward("imagereward", folder)(_images(2), ["a cat", "a dog"])
    assert s.shape == (2,) and torch.isfinite(s).all()
    assert not torch.allclose(s, LocalModelReward("imagereward", tiny_ir)(_images(2), ["a cat", "a dog"]))


def test_imagereward_bad_files_give_clear_errors(tmp_path):
    sd = _imagereward_state_dict()
    with pytest.raises(RewardUnavailableError, match=r"tokenizer/vocab\.txt.*never downloads"):
        LocalModelReward("imagereward", _write_imagereward(tmp_path / "no_vocab", vocab=False))
    with pytest.raises(RewardUnavailableError, match=r"not an ImageReward checkpoint.*mlp\.layers\.7\.weight"):
        LocalModelReward("imagereward", _write_imagereward(
            tmp_path / "no_head", {k: v for k, v in sd.items() if not k.startswith("mlp.layers.7")}))
    with pytest.raises(RewardUnavailableError, match=r"does not match ImageReward's BLIP ViT.*1 missing keys"):
        LocalModelReward("imagereward", _write_imagereward(
            tmp_path / "no_norm", {k: v for k, v in sd.items() if k != "blip.visual_encoder.norm.bias"}))
    bad = dict(sd)
    bad["blip.text_encoder.embeddings.token_type_embeddings.weight"] = torch.zeros(2, IR_T)  # not BLIP's layout
    with pytest.raises(RewardUnavailableError, match=r"BLIP text encoder.*1 unexpected.*token_type_embeddings"):
        LocalModelReward("imagereward", _write_imagereward(tmp_path / "token_types", bad))
    bad = dict(sd)
    bad["blip.text_encoder.encoder.layer.1.output.dense.weight"] = torch.zeros(IR_T, 7)
    with pytest.raises(RewardUnavailableError, match=r"1 shape mismatches.*layer\.1\.output\.dense\.weight"):
        LocalModelReward("imagereward", _write_imagereward(tmp_path / "shape", bad))
    with pytest.raises(RewardUnavailableError, match=r"not an ImageReward checkpoint"):
        LocalModelReward("imagereward", _write_imagereward(tmp_path / "other", _aesthetic_head()))
    with pytest.raises(RewardUnavailableError, match=r"never pickled objects"):
        LocalModelReward("imagereward", _write_imagereward(tmp_path / "pickled", {"model": torch.nn.Linear(2, 2)}))
    folder = _write_imagereward(tmp_path / "wrong_med")
    (folder / "med_config.json").write_text(json.dumps({"hidden_size": 768, "num_attention_heads": 12}))
    with pytest.raises(RewardUnavailableError, match=r"med_config\.json.*does not fit"):
        LocalModelReward("imagereward", folder)
    with pytest.raises(RewardUnavailableError, match=r"not found .*epd_rewards/imagereward"):
        LocalModelReward("imagereward", tmp_path / "missing")


def test_hpsv2_checks_keys_and_shapes_before_building_vit_h_14(tmp_path):
    """issue 21: a wrong file was found out only after the real ~4 GB ViT-H-14 had been built."""
    pytest.importorskip("open_clip")
    torch.save({"state_dict": {"visual.proj": torch.zeros(2)}}, tmp_path / "small.pt")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(RewardUnavailableError, match=r"small\.pt does not match open_clip's ViT-H-14 .*found before "
                                                     r"building it: 685 missing keys"):
        LocalModelReward("hpsv2", tmp_path / "small.pt")
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024 < 500  # MB; was ~4 GB


# ---- issue 29, item 2: reward weights never reach torch.load ------------------------------------------------
@pytest.mark.parametrize("zip_format", [False, True])
def test_pt_reward_weights_are_read_by_the_bounded_reader_exactly(tmp_path, zip_format):
    sd = _aesthetic_head()
    torch.save({"state_dict": sd, "epoch": 7}, tmp_path / "head.pt", _use_new_zipfile_serialization=zip_format)
    loaded = rewards._load_state_dict("aesthetic", tmp_path / "head.pt")
    assert list(loaded) == list(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_the_conversion_command_turns_a_trusted_pt_into_safetensors_that_load(tmp_path):
    """The command a refusal (and README's Security section) gives runs, and its output loads."""
    import subprocess
    import sys
    sd = _aesthetic_head(seed=3)
    torch.save({"state_dict": sd}, tmp_path / "IN.pt")
    cmd = rewards.CONVERT_TO_SAFETENSORS
    assert cmd.startswith("python -c ") and cmd.endswith(" IN.pt OUT.safetensors")
    proc = subprocess.run(cmd.replace("python", f'"{sys.executable}"', 1), shell=True, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = rewards._load_state_dict("aesthetic", tmp_path / "OUT.safetensors")
    assert set(loaded) == set(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_a_pickled_object_in_a_reward_pt_is_refused_with_the_fix(tmp_path):
    torch.save({"head": torch.nn.Linear(2, 2)}, tmp_path / "obj.pt")
    with pytest.raises(RewardUnavailableError) as err:
        rewards._load_state_dict("aesthetic", tmp_path / "obj.pt")
    msg = str(err.value)
    assert "obj.pt" in msg and "torch.nn.modules.linear" in msg and "never pickled objects" in msg, msg
    assert rewards.CONVERT_TO_SAFETENSORS in msg
