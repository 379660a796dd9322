"""rewards.py videoscore: a tiny random VideoScore written in the released folder layout, checked against a
direct Idefics2Model + linear-head computation; batching, frames, query, head order, loading errors."""
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import models
import rewards

N_LATENTS = 4  # image tokens per frame (the real model: 64)
# preprocessor_config.json of TIGER-Lab/VideoScore and VideoScore-v1.1, as released
RELEASED_PREPROCESSOR = {"do_convert_rgb": True, "do_image_splitting": False, "do_normalize": True, "do_pad": True,
                         "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
                         "image_processor_type": "Idefics2ImageProcessor", "image_std": [0.5, 0.5, 0.5],
                         "processor_class": "Idefics2Processor", "resample": 2,
                         "rescale_factor": 0.00392156862745098, "size": {"longest_edge": 980, "shortest_edge": 378}}
SPECIAL = ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]
PROMPTS = ["a red square", "a blue circle moving up slowly", "a green triangle moving right quickly over a long road",
           "a yellow square moving down", "x"]


def write_tokenizer(path):
    """An offline BPE laid out like Idefics2's (Mistral's) tokenizer.json: a normalizer that prepends '▁' and
    turns spaces into '▁', no pre-tokenizer; <unk> 0 (also pad), <s> 1 added as BOS, </s> 2; a tokenizer_config
    naming LlamaTokenizer with legacy false, as Idefics2's and Mantis' do."""
    from tokenizers import Tokenizer, decoders, normalizers, processors, trainers
    from tokenizers.models import BPE

    tok = Tokenizer(BPE(unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator([rewards.VIDEOSCORE_QUERY, " ".join(PROMPTS)], trainer)
    tok.add_special_tokens(SPECIAL)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": True, "add_eos_token": False,
                   "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>",
                   "additional_special_tokens": SPECIAL, "padding_side": "left"}, f)
    return tok.get_vocab_size(), tok.token_to_id("<image>")


def make_tiny_videoscore(path, seed=0):
    """A random tiny VideoScore folder laid out as the release: a Mantis-era config.json (architectures
    Idefics2ForSequenceClassification, top-level pad id, no perceiver eps), 'model.*' + 'score.*' tensors in
    two safetensors shards with an index, processor, preprocessor and tokenizer files. Returns the tensors."""
    from transformers import Idefics2Config, Idefics2Model

    os.makedirs(path)
    vocab, image_id = write_tokenizer(path)
    config = {
        "architectures": ["Idefics2ForSequenceClassification"], "model_type": "idefics2", "image_token_id": image_id,
        "id2label": {str(i): f"LABEL_{i}" for i in range(5)}, "label2id": {f"LABEL_{i}": i for i in range(5)},
        "problem_type": "regression", "pad_token_id": 0, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
        "transformers_version": "4.40.0.dev0",
        "vision_config": {"model_type": "idefics2", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "patch_size": 14, "image_size": 980},
        "perceiver_config": {"model_type": "idefics2", "hidden_act": "silu", "hidden_size": 16, "resampler_depth": 1,
                             "resampler_n_latents": N_LATENTS, "resampler_n_heads": 2, "resampler_head_dim": 8,
                             "num_key_value_heads": 1},
        "text_config": {"model_type": "mistral", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                        "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": vocab, "rms_norm_eps": 1e-5,
                        "pad_token_id": 0, "max_position_embeddings": 4096, "sliding_window": 4096},
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump(RELEASED_PREPROCESSOR, f, indent=2)
    with open(os.path.join(path, "processor_config.json"), "w") as f:
        json.dump({"image_seq_len": N_LATENTS, "processor_class": "Idefics2Processor"}, f)
    torch.manual_seed(seed)
    model = Idefics2Model(Idefics2Config.from_pretrained(path))
    for name, p in model.named_parameters():  # latents init to ones: make every tensor informative
        torch.nn.init.normal_(p, mean=1.0 if "norm" in name else 0.0, std=0.2)
    head = torch.nn.Linear(16, 5)
    tensors = {**{f"model.{k}": v for k, v in model.state_dict().items() if "rotary_emb" not in k},
               "score.weight": head.weight.detach(), "score.bias": head.bias.detach()}
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2]), 1):
        shard = f"model-{i:05d}-of-00002.safetensors"
        save_file({k: tensors[k].contiguous() for k in part}, os.path.join(path, shard))
        weight_map.update({k: shard for k in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(t.numel() * 4 for t in tensors.values())}, "weight_map": weight_map}, f)
    return tensors


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("videoscore") / "VideoScore")
    return path, make_tiny_videoscore(path)


@pytest.fixture(scope="module")
def scorer(folder):
    return rewards.get_scorer("videoscore", folder[0], "cpu")


def video(frames, seed, size=16):
    return np.random.default_rng(seed).integers(0, 256, (frames, size, size, 3), dtype=np.uint8)


def test_query_template():
    q = rewards.VIDEOSCORE_QUERY
    assert len(q) == 1163
    assert hashlib.sha256(q.encode()).hexdigest() == "49b386d9ea3003760c983cc258cf4211faf858d58191f95fcfacdf68a8fed2c0"
    assert rewards.videoscore_query("a cat", 3) == q.replace("{text_prompt}", "a cat") + "<image> <image> <image> "
    with pytest.raises(ValueError, match="image token"):
        rewards.videoscore_query("a <image> cat", 3)


def test_frame_indices():
    assert rewards.videoscore_frame_indices(5, 16).tolist() == [0, 1, 2, 3, 4]
    assert rewards.videoscore_frame_indices(16, 16).tolist() == list(range(16))
    assert rewards.videoscore_frame_indices(20, 16).tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 10, 11, 12, 13, 15, 16, 17, 18]
    assert rewards.videoscore_frame_indices(64, 16).tolist() == list(range(0, 64, 4))
    assert rewards.videoscore_frame_indices(100, 48).tolist()[:5] == [0, 2, 4, 6, 8]
    assert all(len(rewards.videoscore_frame_indices(n, m)) == m for m in (16, 48) for n in range(m + 1, 400))
    assert rewards.videoscore_max_frames("ckpt/VideoScore") == 16
    assert rewards.videoscore_max_frames("ckpt/VideoScore-v1.1/") == 48


def test_loads_released_layout(scorer, folder):
    assert scorer.name == "videoscore" and scorer.max_frames == 16 and scorer.dtype == torch.float32
    # the perceiver normalises with the text model's eps, as Mantis' code does (transformers 5 default: 1e-6)
    eps = {m.variance_epsilon for n, m in scorer.model.connector.named_modules() if hasattr(m, "variance_epsilon")}
    assert eps == {1e-5}
    ip = scorer.processor.image_processor  # PIL resizing, as the transformers 4.x processor it was trained with
    assert not {"TorchvisionBackend", "BaseImageProcessorFast"} & {c.__name__ for c in type(ip).__mro__}
    assert ip.do_image_splitting is False and (ip.size["shortest_edge"], ip.size["longest_edge"]) == (378, 980)
    loaded = {k: v for k, v in scorer.net.state_dict().items() if "rotary_emb" not in k}
    assert loaded.keys() == folder[1].keys() and all(torch.equal(loaded[k], folder[1][k]) for k in loaded)
    assert scorer.fingerprint == rewards.get_scorer("videoscore", folder[0]).fingerprint


def expanded_text(prompt, frames):
    """The query after the processor's expansion: each '<image>' -> <fake> <image> x N_LATENTS <fake>."""
    image = "<fake_token_around_image>" + "<image>" * N_LATENTS + "<fake_token_around_image>"
    return rewards.VIDEOSCORE_QUERY.format(text_prompt=prompt) + (image + " ") * frames


def raw_ids(folder, text):
    """Ids from tokenizer.json itself (the `tokenizers` library, BOS from its post-processor)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(os.path.join(folder[0], "tokenizer.json")).encode(text).ids


def test_image_tokens(scorer, folder):
    batch = scorer.inputs([video(20, 0)], [PROMPTS[0]])  # 20 frames -> 16 seen
    ids = batch["input_ids"][0]
    image_id, fake_id = (scorer.processor.tokenizer.convert_tokens_to_ids(t) for t in SPECIAL[1::-1])
    assert ids[0] == scorer.processor.tokenizer.bos_token_id == 1
    assert (ids == image_id).sum() == 16 * N_LATENTS and (ids == fake_id).sum() == 2 * 16
    # exactly what tokenizer.json gives (transformers 5's LlamaTokenizer would tokenize the spaces differently)
    assert ids.tolist() == raw_ids(folder, expanded_text(PROMPTS[0], 16))
    assert batch["pixel_values"].shape == (1, 16, 3, 378, 378)  # 16x16 frames: both edges up to 378, one image each


def test_matches_direct_computation(scorer, folder):
    """score() == Idefics2Model forward + the linear head, by hand from the files' tensors and tokenizer.json."""
    from PIL import Image
    from transformers import Idefics2Config, Idefics2ImageProcessorPil, Idefics2Model

    path, tensors = folder
    config = Idefics2Config.from_pretrained(path)
    config.perceiver_config.rms_norm_eps = config.text_config.rms_norm_eps
    model = Idefics2Model(config).eval()
    missing, unexpected = model.load_state_dict(
        {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}, strict=False)
    assert unexpected == [] and all("rotary_emb" in k for k in missing)
    v, prompt = video(20, 1), PROMPTS[1]
    frames = [Image.fromarray(v[i]) for i in [0, 1, 2, 3, 5, 6, 7, 8, 10, 11, 12, 13, 15, 16, 17, 18]]
    pixels = Idefics2ImageProcessorPil.from_pretrained(path)([frames], return_tensors="pt")
    ids = torch.tensor([raw_ids(folder, expanded_text(prompt, 16))])
    with torch.no_grad():
        h = model(input_ids=ids, **pixels).last_hidden_state[0, -1]  # (D,) the last token of one sequence
    expected = (h @ tensors["score.weight"].T + tensors["score.bias"]).tolist()
    row = scorer.score([v], [prompt])[0]
    assert list(row) == [*rewards.DIMS, "factual_consistency"]
    assert list(row.values()) == pytest.approx(expected, abs=1e-5)
    assert np.std(expected) > 1e-3  # a random model that does not give five equal numbers


def test_batched_equals_one_by_one(scorer):
    videos = [video(6, 2), video(6, 3), video(20, 4), video(6, 5, size=24)]
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[4], PROMPTS[3]]
    batch = scorer.inputs(videos[:2], prompts[:2])
    assert batch["attention_mask"][0].sum() < batch["attention_mask"].shape[1]  # really padded (right)
    together = scorer.score(videos, prompts)
    for v, p, row in zip(videos, prompts, together):
        alone = scorer.score([v], [p])[0]
        assert list(row.values()) == pytest.approx(list(alone.values()), abs=1e-5)


def test_dimension_order(folder):
    scorer = rewards.get_scorer("videoscore", folder[0], "cpu")
    with torch.no_grad():
        scorer.score_head.weight.zero_()
        scorer.score_head.bias.copy_(torch.arange(1.0, 6.0))
    rows = scorer.score(np.stack([video(3, 6), video(3, 7)]), ["a", "b"])
    expected = {"visual_quality": 1.0, "temporal_consistency": 2.0, "dynamic_degree": 3.0, "text_alignment": 4.0,
                "factual_consistency": 5.0}
    assert rows == [expected, expected]
    out = rewards.aggregate(rows)
    assert out["factual_consistency"]["mean"] == 5.0 and out["average"]["mean"] == 2.5  # FC is not averaged
    assert "factual_consistency" not in rewards.aggregate([expected, {d: 1.0 for d in rewards.DIMS}])


def test_missing_folder_and_files(tmp_path, folder):
    missing = str(tmp_path / "no_such_videoscore")
    with pytest.raises(models.UserError, match="no_such_videoscore.*TIGER-Lab/VideoScore"):
        rewards.get_scorer("videoscore", missing)
    copy = str(tmp_path / "VideoScore")
    shutil.copytree(folder[0], copy)
    os.remove(os.path.join(copy, "model-00002-of-00002.safetensors"))
    with pytest.raises(models.UserError, match="missing model-00002-of-00002.safetensors.*TIGER-Lab/VideoScore"):
        rewards.get_scorer("videoscore", copy)


@pytest.mark.parametrize("change", ["extra", "missing"])
def test_strict_loading(tmp_path, folder, change):
    copy = str(tmp_path / "VideoScore")
    shutil.copytree(folder[0], copy)
    shard = os.path.join(copy, "model-00002-of-00002.safetensors")
    tensors = load_file(shard)
    if change == "extra":
        tensors["model.extra.weight"] = torch.zeros(2)
    else:
        tensors.pop(sorted(k for k in tensors if k.startswith("model."))[0])
    save_file(tensors, shard)
    with pytest.raises(models.UserError, match="Unexpected" if change == "extra" else "Missing"):
        rewards.get_scorer("videoscore", copy)
