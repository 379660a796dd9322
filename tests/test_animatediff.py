"""AnimateDiff: an original motion-module checkpoint loads through diffusers' converter."""
import pytest
import torch

import models


def to_original_layout(sd):
    """diffusers MotionAdapter keys -> the original AnimateDiff layout (inverse of diffusers' converter)."""
    out = {}
    for k, v in sd.items():
        if "pos_embed" in k:
            continue
        head, sep, tail = k.partition(".motion_modules.")
        n, rest = tail.split(".", 1)
        rest = (rest.replace("norm1", "norms.0").replace("norm2", "norms.1").replace("norm3", "ff_norm")
                .replace("attn1", "attention_blocks.0").replace("attn2", "attention_blocks.1"))
        out[f"{head}{sep}{n}.temporal_transformer.{rest}"] = v.clone()
    return out


def test_original_checkpoint_equals_the_folder(animatediff_dirs, tmp_path):
    from diffusers import MotionAdapter

    folder = MotionAdapter.from_pretrained(animatediff_dirs[1])
    ckpt = tmp_path / "mm_tiny.ckpt"
    torch.save({"state_dict": to_original_layout(folder.state_dict())}, ckpt)
    loaded = models.load_motion_adapter(str(ckpt), heads=4, norm_groups=2)
    a, b = folder.state_dict(), loaded.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert tuple(loaded.config.block_out_channels) == tuple(folder.config.block_out_channels)
    assert loaded.config.motion_layers_per_block == folder.config.motion_layers_per_block


def test_not_a_motion_module_is_refused(tmp_path):
    ckpt = tmp_path / "x.ckpt"
    torch.save({"foo.weight": torch.zeros(2)}, ckpt)
    with pytest.raises(models.UserError, match="x.ckpt: no 'down_blocks"):
        models.load_motion_adapter(str(ckpt))
    with pytest.raises(models.UserError, match="not found"):
        models.load_motion_adapter(str(tmp_path / "none.ckpt"))
