"""The built-in generated dataset (no download): the quick start and the tests.

Usage: `--config configs/generated.py:daipnet300` (any Table 2 variant; default width 0.25), or
`--config configs/generated.py:demo` for the tuned quick-start recipe that `make demo` runs.
"""

from daipnet_jax.config import TORCHVISION_MEAN_RGB, TORCHVISION_STD, base_config, parse_arg


def get_config(arg: str | None = None):
    args = parse_arg(arg, name="daipnet300", width=0.25)
    demo = args.name == "demo"
    c = base_config("daipnet300" if demo else args.name, "generated", width=args.width)
    c.model.num_classes = c.data.generated_num_classes + 1
    c.data.max_boxes = 16
    if demo:
        # Trained from scratch (no ImageNet VGG), so inputs are scaled to unit variance rather
        # than the caffe-VGG convention (mean subtraction only) that pretrained weights expect.
        c.name = "demo"
        c.model.pixel_mean = TORCHVISION_MEAN_RGB
        c.model.pixel_std = TORCHVISION_STD
        c.train.batch_size = 8
        c.train.eval_batch_size = 8
        c.train.scale_lr_with_batch = False
        c.train.base_lr = 0.02
        c.train.warmup_epochs = 0.5
        c.train.decay_epochs = (6, 8)
        c.train.total_epochs = 9
        c.train.log_every_steps = 25
        c.train.checkpoint_every_steps = 250
        c.train.max_train_seconds = 660.0
    return c
