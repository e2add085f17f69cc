"""Autoencoder architectures: each a short function of Keras layers returning (encoder, decoder).

Register a new one with `@architecture("name")`; every builder takes the input shape and the
latent size and must map [N, H, W, 3] in [0, 1] -> [N, latent_dim] -> [N, H, W, 3] in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable

import keras
from keras import layers

Builder = Callable[[tuple[int, int, int], int], tuple[keras.Model, keras.Model]]
ARCHITECTURES: dict[str, Builder] = {}


def architecture(name: str) -> Callable[[Builder], Builder]:
    def register(builder: Builder) -> Builder:
        ARCHITECTURES[name] = builder
        return builder

    return register


def build(name: str, input_shape: tuple[int, int, int], latent_dim: int):
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose from {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name](input_shape, latent_dim)


def _selu_conv(filters: int, **kwargs) -> layers.Conv2D:
    return layers.Conv2D(
        filters, 3, padding="same", activation="selu", kernel_initializer="lecun_normal", **kwargs
    )


@architecture("seed")
def seed(input_shape=(128, 128, 3), latent_dim=1024):
    """The reference design: SELU convs, global max pooling, a dense 1024 code."""
    if input_shape[:2] != (128, 128) or latent_dim != 1024:
        raise ValueError("the seed architecture is defined for 128x128 images and a 1024 latent")
    inputs = keras.Input(input_shape, name="image")
    x = inputs
    for filters in (32, 64, 128, 256):
        x = _selu_conv(filters)(x)
        x = layers.MaxPooling2D(2)(x)
    x = _selu_conv(512)(x)
    x = layers.GlobalMaxPooling2D()(x)
    latent = layers.Dense(
        latent_dim, activation="selu", kernel_initializer="lecun_normal", name="latent"
    )(x)
    encoder = keras.Model(inputs, latent, name="encoder")

    code = keras.Input((latent_dim,), name="latent")
    y = layers.Reshape((16, 16, 4))(code)
    for filters in (512, 256, 128):
        y = _selu_conv(filters)(y)
        y = layers.UpSampling2D(2)(y)
    y = _selu_conv(64)(y)
    y = _selu_conv(32)(y)
    image = layers.Conv2D(3, 3, padding="same", activation="sigmoid", name="image")(y)
    decoder = keras.Model(code, image, name="decoder")
    return encoder, decoder


def _conv(filters: int, strides: int = 1, kernel: int = 3) -> layers.Conv2D:
    return layers.Conv2D(
        filters,
        kernel,
        strides=strides,
        padding="same",
        activation="relu",
        kernel_initializer="he_normal",
    )


def _up(filters: int) -> layers.Conv2DTranspose:
    """Learned 2x upsampling; kernel 4 with stride 2 avoids checkerboard artefacts and exports
    to a single ConvTranspose (UpSampling2D becomes a chain of Tile/Reshape ops in ONNX)."""
    return layers.Conv2DTranspose(
        filters, 4, strides=2, padding="same", activation="relu", kernel_initializer="he_normal"
    )


def _residual(x, filters: int):
    """Two 3x3 convs with an identity shortcut: more depth at low resolution, cheap to train."""
    y = _conv(filters)(x)
    y = layers.Conv2D(filters, 3, padding="same", kernel_initializer="he_normal")(y)
    return layers.Activation("relu")(layers.Add()([x, y]))


def _strided_trunk(inputs):
    """The image down to 8x8x128 for 128x128 (stride-2 convs, residual blocks between)."""
    x = _conv(32, strides=2)(inputs)  # 64x64
    x = _conv(64, strides=2)(x)  # 32x32
    x = _residual(x, 64)
    x = _conv(128, strides=2)(x)  # 16x16
    x = _residual(x, 128)
    x = _conv(128, strides=2)(x)  # 8x8
    return _residual(x, 128)


def _upsampling_head(y):
    """From the code's grid (after its first conv) back to the image, x16 in transposed convs."""
    y = _residual(y, 128)
    y = _up(128)(y)  # 16x16
    y = _residual(y, 128)
    y = _up(64)(y)  # 32x32
    y = _residual(y, 64)
    y = _up(32)(y)  # 64x64
    y = _conv(32)(y)
    return layers.Conv2DTranspose(
        3, 4, strides=2, padding="same", activation="sigmoid", name="image"
    )(y)  # 128x128


@architecture("spatial")
def spatial(input_shape=(128, 128, 3), latent_dim=1024):
    """Strided encoder to a spatial code (8x8x16 for 128x128 and 1024): keeps where things are.

    Stride-2 convolutions replace full-resolution convs plus pooling, and the decoder upsamples
    from the code's grid with transposed convolutions, so both halves cost a fraction of the seed's FLOPs.
    """
    grid_h, grid_w = input_shape[0] // 16, input_shape[1] // 16
    if input_shape[0] % 16 or input_shape[1] % 16 or latent_dim % (grid_h * grid_w):
        raise ValueError("spatial needs H, W divisible by 16 and latent_dim by (H/16)*(W/16)")
    code_channels = latent_dim // (grid_h * grid_w)

    inputs = keras.Input(input_shape, name="image")
    x = _strided_trunk(inputs)
    x = layers.Conv2D(code_channels, 1, name="code")(x)
    latent = layers.Flatten(name="latent")(x)
    encoder = keras.Model(inputs, latent, name="encoder")

    code = keras.Input((latent_dim,), name="latent")
    y = layers.Reshape((grid_h, grid_w, code_channels))(code)
    y = _conv(128)(y)
    image = _upsampling_head(y)
    decoder = keras.Model(code, image, name="decoder")
    return encoder, decoder


@architecture("hybrid")
def hybrid(input_shape=(128, 128, 3), latent_dim=1024, global_dim=256):
    """`spatial` with a quarter of the code global: what is where, and what the scene is.

    The latent is still an 8x8 grid of 16 channels for 128x128 and 1024, but 4 of the channels
    (256 numbers) are a dense projection of the average-pooled features, the same whatever the
    position of things; 12 stay a local code. The decoder reads both its grid and, through a dense
    layer, the whole code at every position, so the global numbers can steer the whole image.
    """
    grid_h, grid_w = input_shape[0] // 16, input_shape[1] // 16
    cells = grid_h * grid_w
    if input_shape[0] % 16 or input_shape[1] % 16 or latent_dim % cells or global_dim % cells:
        raise ValueError(
            "hybrid needs H, W divisible by 16 and latent_dim, global_dim by (H/16)*(W/16)"
        )
    code_channels, global_channels = latent_dim // cells, global_dim // cells
    if global_channels >= code_channels:
        raise ValueError("hybrid needs global_dim < latent_dim")

    inputs = keras.Input(input_shape, name="image")
    x = _strided_trunk(inputs)
    local = layers.Conv2D(code_channels - global_channels, 1, name="code")(x)
    summary = layers.Dense(global_dim, name="global_code")(layers.GlobalAveragePooling2D()(x))
    summary = layers.Reshape((grid_h, grid_w, global_channels))(summary)
    latent = layers.Flatten(name="latent")(layers.Concatenate()([summary, local]))
    encoder = keras.Model(inputs, latent, name="encoder")

    code = keras.Input((latent_dim,), name="latent")
    grid = layers.Reshape((grid_h, grid_w, code_channels))(code)
    everywhere = layers.Reshape((grid_h, grid_w, code_channels))(layers.Dense(latent_dim)(code))
    y = _conv(128)(layers.Concatenate()([grid, everywhere]))
    image = _upsampling_head(y)
    decoder = keras.Model(code, image, name="decoder")
    return encoder, decoder


def autoencoder(encoder: keras.Model, decoder: keras.Model) -> keras.Model:
    inputs = keras.Input(encoder.input_shape[1:], name="image")
    return keras.Model(inputs, decoder(encoder(inputs)), name="autoencoder")


DenoiserBuilder = Callable[[int], keras.Model]
DENOISERS: dict[str, DenoiserBuilder] = {}


def denoiser_architecture(name: str) -> Callable[[DenoiserBuilder], DenoiserBuilder]:
    def register(builder: DenoiserBuilder) -> DenoiserBuilder:
        DENOISERS[name] = builder
        return builder

    return register


def build_denoiser(name: str, width: int = 16) -> keras.Model:
    """An image -> image model of any H, W divisible by 16: [N, H, W, 3] in [0, 1] both sides."""
    if name not in DENOISERS:
        raise ValueError(f"unknown denoiser {name!r}; choose from {sorted(DENOISERS)}")
    return DENOISERS[name](width)


@denoiser_architecture("denoiser")
def denoiser(width: int = 16) -> keras.Model:
    """A small residual U-Net: predicts the correction to the noisy image and adds it back.

    A bottleneck autoencoder cannot return more detail than its code keeps; here skip connections
    carry each scale's detail past the bottleneck, so the network only has to learn the noise.
    The first layer is a learned 2x2 space-to-depth (lossless from 12 channels), so every 3x3
    convolution runs at half resolution or less, and the widest layers run at 1/16: that is what
    makes it fast on a CPU while the receptive field still spans most of a 128x128 image.
    """
    inputs = keras.Input((None, None, 3), name="image")
    s1 = layers.Conv2D(width, 2, strides=2)(inputs)  # H/2, linear so nothing is lost
    s2 = _residual(_conv(2 * width, strides=2)(s1), 2 * width)  # H/4
    s3 = _residual(_conv(4 * width, strides=2)(s2), 4 * width)  # H/8
    x = _residual(_conv(8 * width, strides=2)(s3), 8 * width)  # H/16
    x = _residual(x, 8 * width)
    x = _residual(layers.Add()([_up(4 * width)(x), s3]), 4 * width)  # H/8
    x = _residual(layers.Add()([_up(2 * width)(x), s2]), 2 * width)  # H/4
    x = _conv(width)(layers.Add()([_up(width)(x), s1]))  # H/2
    # Zero-initialised, so training starts from the identity: with a random last layer the
    # network spent its first epochs cancelling its own output and stalled there.
    correction = layers.Conv2DTranspose(
        3, 2, strides=2, kernel_initializer="zeros", name="correction"
    )(x)  # H
    # ReLU capped at 1 is a clip to [0, 1] that exports as one ONNX op.
    cleaned = layers.ReLU(max_value=1.0, name="cleaned")(layers.Add()([inputs, correction]))
    return keras.Model(inputs, cleaned, name="denoiser")
