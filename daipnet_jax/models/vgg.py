"""VGG-16 with reduced fc layers, the backbone of every family (paper §3).

conv1_1..conv5_3 (3×3, pad 1, bias, ReLU); max pools 2×2/2 after conv1_2, conv2_2, conv3_3
(ceil mode: 75 → 38 at 300) and conv4_3; pool5 3×3/1 pad 1; conv6 3×3 dilation 6 pad 6
(512 → 1024) + ReLU; conv7 1×1 (1024 → 1024).
Taps before their ReLU: E1 = conv4_3 [B, 38, 38, 512], E2 = conv7 [B, 19, 19, 1024] at 300
(64 / 32 at 512); PyTorch indices in `VGG_TORCH_INDEX`.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from daipnet_jax.models.layers import Array, Dtype, channels, conv, max_pool

# (name, output channels) of the 3×3 convs, None = the 2×2/2 max pool after that stage.
VGG_LAYERS: tuple[tuple[str, int] | None, ...] = (
    ("conv1_1", 64),
    ("conv1_2", 64),
    None,
    ("conv2_1", 128),
    ("conv2_2", 128),
    None,
    ("conv3_1", 256),
    ("conv3_2", 256),
    ("conv3_3", 256),
    None,  # ceil mode
    ("conv4_1", 512),
    ("conv4_2", 512),
    ("conv4_3", 512),
)

# Index of each conv in the PyTorch `nn.ModuleList` (LRF `base.N`, ssd.pytorch `vgg.N`).
VGG_TORCH_INDEX: dict[str, int] = {
    "conv1_1": 0,
    "conv1_2": 2,
    "conv2_1": 5,
    "conv2_2": 7,
    "conv3_1": 10,
    "conv3_2": 12,
    "conv3_3": 14,
    "conv4_1": 17,
    "conv4_2": 19,
    "conv4_3": 21,
    "conv5_1": 24,
    "conv5_2": 26,
    "conv5_3": 28,
    "conv6": 31,
    "conv7": 33,
}


class VGG16(nn.Module):
    """[B, S, S, 3] normalised image → (E1 conv4_3 pre-ReLU, E2 conv7 pre-ReLU)."""

    width: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, Array]:
        def c3(name: str, n: int) -> nn.Conv:
            return conv(channels(n, self.width), 3, padding=1, dtype=self.dtype, name=name)

        pools = 0
        for layer in VGG_LAYERS[:-1]:
            if layer is None:
                pools += 1
                x = max_pool(x, 2, 2, ceil_mode=pools == 3)
            else:
                x = nn.relu(c3(*layer)(x))
        e1 = c3(*VGG_LAYERS[-1])(x)  # type: ignore[misc]
        x = max_pool(nn.relu(e1), 2, 2)
        for name in ("conv5_1", "conv5_2", "conv5_3"):
            x = nn.relu(c3(name, 512)(x))
        x = max_pool(x, 3, 1, padding=1)
        x = conv(
            channels(1024, self.width), 3, padding=6, dilation=6, dtype=self.dtype, name="conv6"
        )(x)
        x = nn.relu(x)
        e2 = conv(channels(1024, self.width), 1, dtype=self.dtype, name="conv7")(x)
        return e1, e2
