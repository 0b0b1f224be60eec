"""The shared recipe: every section and its defaults, for any dataset.

The dataset files set classes, prior sizes, source, learning rate, schedule and batch; every key
is in the README's config reference.
"""

from __future__ import annotations

import ml_collections

from daipnet_jax import config as config_lib


def recipe(variant: str, *, width: float = 1.0) -> ml_collections.ConfigDict:
    """The dataset-independent part of the config of `variant` (e.g. `daipnet300`)."""
    base, size = config_lib.variant_name(variant)
    c = ml_collections.ConfigDict()
    c.name = variant
    c.seed = 0

    m = c.model = ml_collections.ConfigDict()
    switches = config_lib.VARIANTS[base]
    m.family = "ssd" if switches is None else "lrf"
    m.aux, m.fusion, m.topdown = switches if switches else ("lsn", "lrf", "lrf")
    m.image_size = size
    m.num_classes = 81  # background included; set by the dataset file
    m.width = width
    m.dtype = "float32"  # or "bfloat16": compute dtype; params stay float32
    m.align_corners = False  # True to match the released (PyTorch 0.3.1) LRF weights
    m.pixel_mean = config_lib.CAFFE_MEAN_RGB
    m.pixel_std = config_lib.CAFFE_STD

    c.priors = ml_collections.ConfigDict()  # set by the dataset file (`set_priors`)

    d = c.data = ml_collections.ConfigDict()
    d.source = "tfds"  # tfds | coco_folder | generated
    d.tfds_name = ""
    d.train_split = "train"
    d.eval_split = "validation"
    d.data_dir = ""  # tfds data_dir, or the generated dataset's folder
    d.annotation_file = ""  # COCO-format folder: instances JSON (train)
    d.image_dir = ""  # COCO-format folder: images (train)
    d.eval_annotation_file = ""
    d.eval_image_dir = ""
    d.eval_max_images = 0  # > 0: evaluate only the first N images (partial metrics)
    d.max_boxes = 64
    d.shuffle_buffer = 2048
    d.num_parallel_calls = -1  # tf.data.AUTOTUNE
    d.prefetch = 2
    d.cache = False
    # Generated dataset (see daipnet_jax.data.generated).
    d.generated_num_train = 2000
    d.generated_num_val = 200
    d.generated_num_classes = 3
    d.generated_image_size = 300
    d.generated_seed = 0  # the dataset's own seed (independent of the training seed)
    d.validate_files = True  # COCO-format folders: header-check every image at build time
    # SSD augmentation (paper Section 4.2); `augment=False` trains on plain resized images.
    d.augment = True
    d.expand_prob = 0.6
    d.max_expand_ratio = 4.0

    p = c.postprocess = ml_collections.ConfigDict()
    p.score_threshold = 0.01
    p.nms_iou = 0.45
    p.per_class_max = 50
    p.max_detections = 200
    p.pre_nms_top_k = 1000  # candidates per class fed to NMS (see postprocess.detect)

    t = c.train = ml_collections.ConfigDict()
    t.batch_size = 32  # global, over all devices and hosts
    t.eval_batch_size = 8
    t.base_lr = 4e-3  # at reference_batch_size
    t.reference_batch_size = 32
    t.scale_lr_with_batch = True
    t.warmup_init_lr = 1e-6
    t.momentum = 0.9
    t.optimizer = "sgd"  # the paper's recipe; "adam" only for the from-scratch quick start
    t.weight_decay = 5e-4
    # Epochs are floats so that `--config.train.warmup_epochs=0.5` is accepted.
    t.warmup_epochs = 6.0
    t.decay_epochs = (90.0, 120.0, 140.0)
    t.total_epochs = 160.0
    t.decay_factor = 0.1
    t.total_steps = -1  # > 0 overrides total_epochs (durations in steps)
    t.train_examples = -1  # epoch size; -1: from the data source
    t.neg_pos_ratio = 3
    t.match_iou = 0.5
    t.log_every_steps = 50
    t.checkpoint_every_steps = 1000
    t.keep_checkpoints = 3
    t.eval_every_steps = 0  # 0: evaluate only at the end
    t.max_train_seconds = 0.0  # > 0: stop (and checkpoint) after this wall time
    t.nan_guard = True
    t.transfer_guard = "disallow"

    i = c.init = ml_collections.ConfigDict()
    i.vgg = ""  # directory written by `python -m daipnet_jax.convert torchvision-vgg16|ssd-vgg`
    i.checkpoint = ""  # a full converted checkpoint (lrf / ssd) to start from
    return c


def set_priors(
    c: ml_collections.ConfigDict, sizes: dict[int, tuple[list[float], list[float]]]
) -> None:
    """Fill `c.priors` from the dataset's (min_sizes, max_sizes) per input size."""
    min_sizes, max_sizes = sizes[int(c.model.image_size)]
    c.priors = ml_collections.ConfigDict(
        config_lib.prior_table(int(c.model.image_size), c.model.family, min_sizes, max_sizes)
    )
