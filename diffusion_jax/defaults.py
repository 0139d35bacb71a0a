"""Defaults for every config key; presets start from here and change what they need.

Groups: ``data`` (what to train on), ``model`` (the denoiser), ``diffusion`` (schedule, prediction
target, loss weighting, time sampling), ``training`` (optimizer, steps, checkpoints, logging) and
``sampling`` (how ``--mode=sample`` and the periodic sample grids generate), ``text`` (the
text encoder of caption-conditioned models), ``evaluation`` and
``classifier`` (``--mode=eval`` and the feature extractor it uses), ``mesh`` (how the devices
are arranged and how a step uses them) and ``distributed`` (runs of several processes).
"""

import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    config.data.name = "shapes"  # fashion_mnist | tfds | shapes | captions | toy2d
    config.data.path = ""  # Fashion-MNIST IDX folder; "" = the Debian package's location
    config.data.tfds_name = ""  # e.g. "cifar10" when name == "tfds"
    config.data.data_dir = ""  # TFDS data_dir holding the prepared dataset
    config.data.split = "train"
    config.data.toy_kind = "mixture"  # toy2d: mixture | checkerboard | swiss_roll
    config.data.size = 50_000  # number of procedural examples (shapes, captions, toy2d)
    config.data.resolution = 32  # shapes, captions: image size
    config.data.batch_size = 128  # global batch size
    config.data.class_conditional = True  # use labels when the data has them
    # Processes that decode/render examples beside the training process (grain workers); 0 reads
    # in the training process. Raise it when the device waits for data (procedural captions
    # render ~1.6k images/s per process). Each worker batches its own share of the examples, so
    # the batches depend on it: resume a run with the value it was started with.
    config.data.worker_count = 0

    config.model = ml_collections.ConfigDict()
    config.model.name = "unet"  # unet | dit | mlp
    config.model.channels = 64  # unet: base width
    config.model.channel_mult = (1, 2, 2)
    config.model.num_res_blocks = 2
    config.model.attention_resolutions = (16,)
    config.model.num_heads = 1
    config.model.dropout = 0.1
    config.model.scale_shift = False
    config.model.dit_size = "S"  # dit: S | B | L | XL
    config.model.patch_size = 2
    config.model.hidden = 256  # mlp
    config.model.depth = 4  # mlp
    config.model.noise_scale = 1000.0
    config.model.dtype = "float32"  # computation dtype: float32 | bfloat16
    config.model.head_dim = 0  # unet: > 0 gives each attention block channels // head_dim heads
    config.model.mid_attention = True  # unet: attention between the two middle res blocks
    # Text conditioning (set by the text pipeline): width of the text-token embeddings the unet's
    # attention blocks / the dit's blocks cross-attend to; 0 = no cross-attention parameters.
    config.model.context_dim = 0
    config.model.pooled_dim = 0  # width of a pooled text embedding added to the time embedding
    config.model.transformer_depth = 1  # unet with context_dim: transformer blocks per attention
    config.model.remat = False  # recompute each block's activations in the backward pass
    # Generator of training dropout masks: "threefry" (the same masks on any number of devices)
    # or "rbg" (XLA's RngBitGenerator: cheaper on GPU/TPU; masks depend on the device layout).
    config.model.dropout_rng = "threefry"
    # Attention kernel (unet, dit): "xla" (any backend), "cudnn" (cuDNN flash attention: GPU and
    # bfloat16 only, an error elsewhere) or "auto" (cuDNN where it applies, else XLA).
    config.model.attention = "xla"

    config.diffusion = ml_collections.ConfigDict()
    config.diffusion.schedule = "cosine"
    config.diffusion.schedule_params = ml_collections.ConfigDict()  # e.g. {"sigma_max": 80.0}
    config.diffusion.target = "v"  # eps | x0 | v | flow | edm
    config.diffusion.sigma_data = 0.5  # edm target only
    config.diffusion.weighting = "mse"  # mse | snr | min_snr | edm | sigmoid
    config.diffusion.weighting_params = ml_collections.ConfigDict()  # e.g. {"gamma": 5.0}
    config.diffusion.time_sampling = "uniform"
    config.diffusion.time_sampling_params = ml_collections.ConfigDict()
    config.diffusion.label_dropout = 0.1  # probability of the null label in training
    config.diffusion.caption_dropout = 0.1  # probability of the empty caption in training

    config.training = ml_collections.ConfigDict()
    config.training.num_steps = 20_000
    config.training.learning_rate = 2e-4
    config.training.warmup_steps = 500
    config.training.grad_clip = 1.0
    config.training.weight_decay = 0.0
    config.training.ema_decay = 0.9995
    config.training.log_every = 100
    config.training.checkpoint_every = 2_000
    config.training.keep_checkpoints = 3
    config.training.sample_every = 5_000  # 0 disables periodic sample grids
    # Speed and memory (the result does not depend on them, up to float rounding):
    config.training.grad_accumulation = 1  # microbatches per step (divides the per-device batch)
    config.training.steps_per_call = 1  # train steps per device call (lax.scan); divides the
    #   log/checkpoint/sample intervals and num_steps
    config.training.prefetch = 2  # batches assembled on the devices ahead of the step

    config.sampling = ml_collections.ConfigDict()
    config.sampling.method = "dpmpp_2m"
    config.sampling.num_steps = 30
    config.sampling.grid = "trailing"
    config.sampling.num_samples = 64
    config.sampling.seed = 0
    config.sampling.label = -1  # class to generate; -1 = cycle through all classes
    config.sampling.guidance_scale = 1.0
    # Text models: what to draw ("" = captions of the data); several prompts separated by "|"
    # are used in turn. The negative prompt replaces the empty caption in guidance.
    config.sampling.prompt = ""
    config.sampling.negative_prompt = ""
    config.sampling.guidance_rescale = 0.0  # Lin et al. 2023; 0 = off, 0.7 typical
    config.sampling.checkpoint_step = -1  # what --mode=sample and --mode=eval use; -1 = latest
    config.sampling.use_ema = True

    # Text conditioning (data.name = "captions"): a byte-level Transformer text encoder trained
    # with the denoiser, which cross-attends to its token embeddings.
    config.text = ml_collections.ConfigDict()
    config.text.max_length = 96  # tokens (UTF-8 bytes + 2); longer captions are cut
    config.text.width = 256
    config.text.depth = 4
    config.text.num_heads = 4
    config.text.freeze = False  # stop gradients at the encoder's outputs

    # --mode=eval: metrics of generated samples, in the feature space of a classifier trained on
    # the same data with --mode=train_classifier, or of FID's Inception-v3.
    config.evaluation = ml_collections.ConfigDict()
    config.evaluation.num_samples = 2_000  # generated samples (and data examples) per metric
    # Generation batch; a multiple of the device count spreads it over all devices (512 divides
    # every power of two up to 512), otherwise every device generates all of it.
    config.evaluation.batch_size = 512
    config.evaluation.classifier_dir = ""  # "" = WORKDIR/classifier
    # Features for the Fréchet distance and precision/recall: "classifier" (the one above) or
    # "inception" (FID's Inception-v3, from pytorch-fid's weights file, which you provide).
    config.evaluation.feature_extractor = "classifier"
    config.evaluation.inception_weights = ""  # pt_inception-2015-12-05-6726825d.pth or .npz
    config.evaluation.precision_recall_k = 3
    config.evaluation.likelihood_examples = 0  # test examples for bits/dim; 0 skips it
    config.evaluation.likelihood_steps = 64  # RK4 steps of the probability-flow ODE
    # Text-to-image (data.name = "captions"): --mode=eval measures prompt adherence (attribute
    # accuracy, seen vs held-out pairs) at each of these guidance scales, e.g. (0.0, 1.0, 3.0, 5.0);
    # () = config.sampling.guidance_scale only.
    config.evaluation.guidance_scales = ()

    # --mode=train_classifier: the feature extractor for --mode=eval (for captioned data: the
    # multi-head attribute classifier that judges prompt adherence).
    config.classifier = ml_collections.ConfigDict()
    config.classifier.num_steps = 2_000
    config.classifier.batch_size = 128
    config.classifier.learning_rate = 1e-3
    config.classifier.width = 32
    config.classifier.feature_dim = 128

    # Devices form a data x fsdp mesh; the batch is split over both, large parameters over fsdp.
    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1  # -1 = all devices not used by the other axis
    config.mesh.fsdp = 1
    # How a step computes its gradients: "jit" (XLA partitions the whole step by the shardings)
    # or "shard_map" (explicit per-device loss and gradients, averaged with pmean).
    config.mesh.train_step = "jit"
    # Device memory layouts of the train state: "auto" lets the compiler pick each array's layout
    # for the train step (e.g. convolution kernels in the order cuDNN's gradients come out, so the
    # optimizer update does not transpose them every step); "default" keeps row-major arrays.
    config.mesh.state_layouts = "auto"

    # Several processes (hosts of a TPU pod slice, GPU nodes): run the same command on each with
    # initialize=True. Empty/-1 values are auto-detected (Cloud TPU, SLURM, Open MPI); on plain
    # machines give the coordinator (process 0's host:port), the process count and each id.
    # auto_detect also initialises when a launcher started several processes (srun with several
    # tasks, mpirun, several TPU workers, JAX_COORDINATOR_ADDRESS), so that they never train as
    # separate runs into one workdir; False runs each process alone. timeout_s: how long a
    # process waits for all the others to join before JAX ends it.
    config.distributed = ml_collections.ConfigDict()
    config.distributed.initialize = False
    config.distributed.auto_detect = True
    config.distributed.coordinator_address = ""
    config.distributed.num_processes = -1
    config.distributed.process_id = -1
    config.distributed.timeout_s = 300
    return config
