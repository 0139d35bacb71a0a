"""The config schema: every key and its default value; presets change what they need.

Groups: ``data`` (what to train on), ``model`` (the denoiser), ``diffusion`` (schedule, prediction
target, loss weighting, time sampling), ``training`` (optimizer, steps, checkpoints, logging) and
``sampling`` (how ``--mode=sample`` and the periodic sample grids generate), ``autoencoder``
(the network and losses of ``task="autoencoder"`` runs), ``latent`` (the frozen autoencoder whose
latent space a diffusion model works in), ``text`` (the
text encoder of caption-conditioned models), ``evaluation`` and
``classifier`` (``--mode=eval`` and the feature extractor it uses), ``pretrained`` (a Stable
Diffusion model in the diffusers folder format), ``mesh`` (how the devices
are arranged and how a step uses them) and ``distributed`` (runs of several processes).
"""

import ml_collections

from diffusion_jax.models import registry

__all__ = ["get_config"]


def get_config() -> ml_collections.ConfigDict:
    """Every config key with its default value."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    # What the config is sized for: "any" machine, or an "accelerator" (GPU/TPU), in which case
    # training on a machine without one says so at the start and names cpu_preset, the same job
    # sized for a CPU, when there is one.
    config.sized_for = "any"
    config.cpu_preset = ""
    # What the run trains: "diffusion" (a denoiser, in pixel space or in the latent space of
    # config.latent.autoencoder) or "autoencoder" (the KL autoencoder of config.autoencoder, the
    # first stage of latent diffusion).
    config.task = "diffusion"
    config.data = _data()
    config.model = _model()
    config.diffusion = _diffusion()
    config.training = _training()
    config.sampling = _sampling()
    config.autoencoder = _autoencoder()
    config.latent = _latent()
    config.text = _text()
    config.evaluation = _evaluation()
    config.classifier = _classifier()
    config.pretrained = _pretrained()
    config.lora = _lora()
    config.controlnet = _controlnet()
    config.mesh = _mesh()
    config.distributed = _distributed()
    return config


def _data() -> ml_collections.ConfigDict:
    data = ml_collections.ConfigDict()
    # fashion_mnist | tfds | shapes | captions | toy2d | folder | tones | audio_folder |
    # moving_shapes | video_folder | shape_points | molecules | molecule_folder
    data.name = "shapes"
    # Fashion-MNIST IDX folder ("" = the Debian package's location); folder: the folder of
    # images (png/jpg; captions from metadata.jsonl or a .txt beside each image)
    data.path = ""
    data.tfds_name = ""  # e.g. "cifar10" when name == "tfds"
    data.data_dir = ""  # TFDS data_dir holding the prepared dataset
    # the split trained on (tfds: with its slicing, e.g. "train[:90%]"), and the held-out split
    # (the classifier's test images, bits/dim; e.g. "test" or "train[90%:]")
    data.split = "train"
    data.test_split = "test"
    # tfds: the image feature, and the label feature ("" = "label" when the dataset has one)
    data.image_key = "image"
    data.label_key = ""
    data.toy_kind = "mixture"  # toy2d: mixture | checkerboard | swiss_roll
    data.size = 50_000  # number of procedural examples (shapes, captions, toy2d)
    # captions: what split "train" leaves out and "heldout" holds: "pairs" (three (shape, colour)
    # pairs), or a colour or shape name (a concept "train" never shows; a colour is not named
    # as a background either); and the most objects in one image (1 to 4)
    data.heldout = "pairs"
    data.max_objects = 3
    data.resolution = 32  # shapes, captions, folder, videos: image/frame size (folder: crop size)
    # Audio (tones, audio_folder): samples per second, samples per clip (a folder's clips are
    # resampled and centre-cropped to it) and channels (1 = mono: a folder's clips are mixed down)
    data.sample_rate = 8000
    data.clip_length = 4096
    data.audio_channels = 1
    # Video (moving_shapes, video_folder): frames per clip, every frame_stride-th frame of a
    # folder's clips, and the frame rate sampled clips are written at (GIF, MP4)
    data.frames = 16
    data.frame_stride = 1
    data.fps = 8
    # Point clouds (shape_points): points per shape. Molecules (molecules: small organic
    # molecules from a built-in SMILES list with RDKit conformers; molecule_folder: the user's
    # .xyz/.sdf files under data.path): the most atoms per molecule (hydrogens included; the
    # model's set size), the most heavy atoms (molecules), the elements the model knows (comma
    # separated, one feature channel each) and the scale of those one-hot channels against the
    # positions in Angstrom (0.25, as Hoogeboom et al. 2022).
    data.num_points = 128
    data.max_atoms = 29
    data.max_heavy_atoms = 9
    data.elements = "H,C,N,O,F"
    data.feature_scale = 0.25
    data.resize = False  # tfds: resize and centre-crop the images to data.resolution
    # folder: "none" (unconditional), "auto" (captions where given, "" elsewhere) or "required";
    # anything but "none" trains a text-conditioned model, as for data.name="captions"; for
    # tones and moving_shapes anything but "none" trains on their captions instead of labels
    data.captions = "none"
    data.batch_size = 128  # global batch size
    data.class_conditional = True  # use labels when the data has them
    # Processes that decode/render examples beside the training process (grain workers); 0 reads
    # in the training process. Raise it when the device waits for data. Each worker batches its
    # own share of the examples, so the batches depend on it: resume a run with the value it was
    # started with.
    data.worker_count = 0
    return data


def _model() -> ml_collections.ConfigDict:
    # The denoiser: a registered family (diffusion_jax/models/registry.py) and its own keys in
    # the sub-group of its name; the keys below the groups are shared by every family.
    model = ml_collections.ConfigDict()
    model.name = "unet"  # unet | dit | mlp
    for name, family in registry.FAMILIES.items():
        model[name] = family.default_group()
    model.dropout = 0.1
    model.noise_scale = 1000.0
    model.dtype = "float32"  # computation dtype: float32 | bfloat16
    # Text conditioning (set by the text pipeline): width of the text-token embeddings the unet's
    # attention blocks / the dit's blocks cross-attend to; 0 = no cross-attention parameters.
    model.context_dim = 0
    model.pooled_dim = 0  # width of a pooled text embedding added to the time embedding
    model.remat = False  # recompute each block's activations in the backward pass
    # Generator of training dropout masks: "threefry" (the same masks on any number of devices)
    # or "rbg" (XLA's RngBitGenerator: cheaper on GPU/TPU; masks depend on the device layout).
    model.dropout_rng = "threefry"
    # Attention kernel (unet, dit): "xla" (any backend), "cudnn" (cuDNN flash attention: GPU and
    # bfloat16 only, an error elsewhere) or "auto" (cuDNN where it applies, else XLA).
    model.attention = "xla"
    return model


def _diffusion() -> ml_collections.ConfigDict:
    diffusion = ml_collections.ConfigDict()
    diffusion.schedule = "cosine"
    diffusion.schedule_params = ml_collections.ConfigDict()  # e.g. {"sigma_max": 80.0}
    diffusion.target = "v"  # eps | x0 | v | flow | edm
    diffusion.sigma_data = 0.5  # edm target only
    diffusion.weighting = "mse"  # mse | snr | min_snr | edm | sigmoid
    diffusion.weighting_params = ml_collections.ConfigDict()  # e.g. {"gamma": 5.0}
    diffusion.time_sampling = "uniform"
    diffusion.time_sampling_params = ml_collections.ConfigDict()
    diffusion.label_dropout = 0.1  # probability of the null label in training
    diffusion.caption_dropout = 0.1  # probability of the empty caption in training
    return diffusion


def _training() -> ml_collections.ConfigDict:
    training = ml_collections.ConfigDict()
    training.num_steps = 20_000
    training.learning_rate = 2e-4
    training.warmup_steps = 500
    training.grad_clip = 1.0
    training.weight_decay = 0.0
    training.ema_decay = 0.9995
    training.log_every = 100
    training.checkpoint_every = 2_000
    training.keep_checkpoints = 3
    # A damaged newest checkpoint: "error" stops and says which; "fallback" restores the newest
    # readable one instead (the damaged ones are moved aside at the next save).
    training.on_corrupt_checkpoint = "error"
    training.sample_every = 5_000  # 0 disables periodic sample grids
    # Speed and memory (the result does not depend on them, up to float rounding):
    training.grad_accumulation = 1  # microbatches per step (divides the per-device batch)
    training.steps_per_call = 1  # train steps per device call (lax.scan); divides the
    #   log/checkpoint/sample intervals and num_steps
    training.prefetch = 2  # batches assembled on the devices ahead of the step
    return training


def _autoencoder() -> ml_collections.ConfigDict:
    # task="autoencoder": the network (the architecture of Stable Diffusion's AutoencoderKL,
    # downsampling by 2 ** (levels - 1)) and its training objective (Rombach et al. 2022, after
    # Esser et al. 2021): reconstruction + kl_weight * KL + an optional perceptual (LPIPS) term
    # and an optional PatchGAN discriminator. Reconstruction and KL are summed over each
    # example's values (the convention SD's kl_weight=1e-6 was chosen under), averaged over the
    # batch.
    autoencoder = ml_collections.ConfigDict()
    autoencoder.block_out_channels = (64, 128, 128)  # widths per level
    autoencoder.layers_per_block = 1
    autoencoder.latent_channels = 4
    autoencoder.norm_num_groups = 32
    autoencoder.mid_attention = True  # self-attention in the middle blocks
    autoencoder.reconstruction = "l1"  # l1 | l2
    autoencoder.kl_weight = 1e-6
    # LPIPS-VGG perceptual loss: the weights file (an .npz converted with `python -m
    # diffusion_jax.models.lpips convert`); "" = off whatever the weight.
    autoencoder.perceptual_weight = 1.0
    autoencoder.lpips_weights = ""
    # PatchGAN discriminator with the hinge loss, switched on at step disc_start; its loss is
    # weighted adaptively (Esser et al. 2021) times disc_weight; 0 = no discriminator.
    autoencoder.disc_weight = 0.0
    autoencoder.disc_start = 5_000
    autoencoder.disc_layers = 3
    autoencoder.disc_channels = 64
    return autoencoder


def _latent() -> ml_collections.ConfigDict:
    # Latent diffusion (task="diffusion"): the denoiser works on the latents of a frozen
    # autoencoder and samples are decoded to images. "" = pixel-space diffusion.
    latent = ml_collections.ConfigDict()
    latent.autoencoder = ""  # workdir of a task="autoencoder" run, or a diffusers `vae/` folder
    latent.checkpoint_step = -1  # of the autoencoder run; -1 = its latest
    # Latents are multiplied by scale (to unit variance) before diffusion; 0 = a diffusers
    # folder's scaling_factor, or for an autoencoder run 1 / std of the latents of
    # scale_batches batches of the data, measured when the run starts and kept in
    # WORKDIR/latent.json.
    latent.scale = 0.0
    latent.scale_batches = 8
    # A folder of latents written once by --mode=encode_dataset; "" = encode each batch in the
    # train step's input pipeline (posterior samples drawn from the step's key).
    latent.precomputed = ""
    return latent


def _sampling() -> ml_collections.ConfigDict:
    sampling = ml_collections.ConfigDict()
    # A sampler of diffusion_jax.samplers, or (with pretrained.path) "scheduler": the model
    # folder's own scheduler, its update rule, timesteps and final step.
    sampling.method = "dpmpp_2m"
    sampling.num_steps = 30
    # A time grid, or (with pretrained.path) "scheduler": the folder's timestep spacing.
    sampling.grid = "trailing"
    sampling.num_samples = 64
    sampling.seed = 0
    sampling.label = -1  # class to generate; -1 = cycle through all classes
    sampling.guidance_scale = 1.0
    # Text models: what to draw ("" = captions of the data); several prompts separated by "|"
    # are used in turn. The negative prompt replaces the empty caption in guidance.
    sampling.prompt = ""
    sampling.negative_prompt = ""
    sampling.guidance_rescale = 0.0  # Lin et al. 2023; 0 = off, 0.7 typical
    sampling.checkpoint_step = -1  # what --mode=sample and --mode=eval use; -1 = latest
    sampling.use_ema = True
    # Editing (--mode=sample): an image to start from (image-to-image, SDEdit), and a mask
    # (white = repaint) to inpaint it. strength: the share of the steps run from the noised
    # image (0 returns it, 1 starts from pure noise); -1 = 0.8 for image-to-image, 1.0 for
    # inpainting. RePaint's resampling: every jump_length steps go back and run them again,
    # jump_n_sample times in all (1 = off).
    sampling.init_image = ""
    sampling.mask_image = ""
    sampling.strength = -1.0
    sampling.jump_length = 10
    sampling.jump_n_sample = 1
    # ControlNets (a ControlNet run, or pretrained.controlnet): control images, comma-separated,
    # one per ControlNet ("" = a ControlNet run's controls of the data's test records); with
    # control_type "canny" they are ordinary images whose edges are computed ("" = the files
    # are the control maps). control_scales: one conditioning scale per ControlNet (() = 1 each);
    # control_start / control_end: the fraction of the steps over which the control acts.
    sampling.control_image = ""
    sampling.control_type = ""
    sampling.control_scales = ()
    sampling.control_start = 0.0
    sampling.control_end = 1.0
    return sampling


def _text() -> ml_collections.ConfigDict:
    # Text conditioning (data.name = "captions"): a byte-level Transformer text encoder trained
    # with the denoiser, which cross-attends to its token embeddings.
    text = ml_collections.ConfigDict()
    text.max_length = 96  # tokens (UTF-8 bytes + 2); longer captions are cut
    text.width = 256
    text.depth = 4
    text.num_heads = 4
    text.freeze = False  # stop gradients at the encoder's outputs
    return text


def _evaluation() -> ml_collections.ConfigDict:
    # --mode=eval: metrics of generated samples, in the feature space of a classifier trained on
    # the same data with --mode=train_classifier, or of FID's Inception-v3.
    evaluation = ml_collections.ConfigDict()
    evaluation.num_samples = 2_000  # generated samples (and data examples) per metric
    # Generation batch; a multiple of the device count spreads it over all devices (512 divides
    # every power of two up to 512), otherwise every device generates all of it.
    evaluation.batch_size = 512
    evaluation.classifier_dir = ""  # "" = WORKDIR/classifier
    # the split whose images are the reference set of the Fréchet distance and precision/recall
    # ("" = data.split, the training images; e.g. "test" for held-out statistics)
    evaluation.reference_split = ""
    # Features for the Fréchet distance and precision/recall: "classifier" (the one above) or
    # "inception" (FID's Inception-v3, from pytorch-fid's weights file, which you provide).
    evaluation.feature_extractor = "classifier"
    evaluation.inception_weights = ""  # pt_inception-2015-12-05-6726825d.pth or .npz
    evaluation.precision_recall_k = 3
    evaluation.likelihood_examples = 0  # test examples for bits/dim; 0 skips it
    evaluation.likelihood_steps = 64  # RK4 steps of the probability-flow ODE
    # Text-to-image (data.name = "captions") and tones: --mode=eval measures prompt adherence
    # (attribute accuracy, seen vs held-out pairs), or pitch and label accuracy, at each of these
    # guidance scales, e.g. (0.0, 1.0, 3.0, 5.0); () = config.sampling.guidance_scale only.
    evaluation.guidance_scales = ()
    # Moving shapes: also generate each held-out clip from its own first frame (image-to-video,
    # with sampling.jump_n_sample / jump_length) at every scale, and score it beside.
    evaluation.first_frame = False
    # A pretrained Stable Diffusion folder (pretrained.path, no run in the workdir): the prompts
    # to generate from, one per line of this UTF-8 file; "" = the captions of config.data,
    # whose images are the reference set of the Fréchet distance.
    evaluation.prompts_file = ""
    return evaluation


def _classifier() -> ml_collections.ConfigDict:
    # --mode=train_classifier: the feature extractor for --mode=eval (for captioned data: the
    # multi-head attribute classifier that judges prompt adherence).
    classifier = ml_collections.ConfigDict()
    classifier.num_steps = 2_000
    classifier.batch_size = 128
    classifier.learning_rate = 1e-3
    classifier.width = 32
    classifier.feature_dim = 128
    return classifier


def _lora() -> ml_collections.ConfigDict:
    # LoRA (Hu et al. 2021): train low-rank adapters of a frozen model instead of the model.
    # The base is the run in lora.base (a workdir; its EMA parameters at lora.base_step, -1 =
    # the latest) or the Stable Diffusion folder pretrained.path. rank 0 = off (train it all).
    lora = ml_collections.ConfigDict()
    lora.rank = 0
    lora.alpha = 0.0  # the adapters' scale is alpha / rank; 0 = rank (scale 1)
    # Which of the denoiser's kernels get adapters: a preset of diffusion_jax.lora.PRESETS
    # ("attention": the q/k/v/out projections) or regular expressions, comma-separated.
    lora.targets = "attention"
    lora.text_encoder = False  # adapters on the text encoder too (needs text.freeze=False)
    lora.base = ""
    lora.base_step = -1
    return lora


def _controlnet() -> ml_collections.ConfigDict:
    # ControlNet (Zhang et al. 2023): train a copy of a frozen denoiser's encoder that reads a
    # control image computed from each training image (control: "" = off, "canny" edges, or for
    # the procedural shapes the exact object "mask" or a "depth"-like map). The base is the run
    # in controlnet.base (a workdir; its EMA parameters at base_step, -1 = the latest) or the
    # Stable Diffusion folder pretrained.path. embedding_channels: the widths of the control
    # image's encoder, one stride-2 stage per halving from the image to the denoiser's input
    # (() = 16, 32, 96, 256 cut to the stages needed).
    controlnet = ml_collections.ConfigDict()
    controlnet.control = ""
    controlnet.base = ""
    controlnet.base_step = -1
    controlnet.embedding_channels = ()
    return controlnet


def _pretrained() -> ml_collections.ConfigDict:
    # A pretrained Stable Diffusion model (1.x, 2.x or XL base) in the diffusers folder format
    # (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/, safetensors
    # weights): --mode=sample generates from it with its own text encoders, UNet, VAE and, with
    # sampling.method="scheduler", its own scheduler. "" = none.
    pretrained = ml_collections.ConfigDict()
    pretrained.path = ""
    pretrained.height = 0  # image size in pixels; 0 = the size the model was trained for
    pretrained.width = 0
    # Parameters as loaded: "float32", or "bfloat16" (half the memory; computation follows
    # model.dtype).
    pretrained.param_dtype = "float32"
    pretrained.batch_size = 4  # images per generation call (num_samples are made in batches)
    # LoRA files to sample with (diffusers/PEFT or kohya naming), comma-separated, and their
    # strengths (one per file; () = 1 for each).
    pretrained.lora = ""
    pretrained.lora_scales = ()
    # diffusers ControlNetModel folders to sample with, comma-separated (their control images
    # and scales: config.sampling.control_*).
    pretrained.controlnet = ""
    return pretrained


def _mesh() -> ml_collections.ConfigDict:
    # Devices form a data x fsdp mesh; the batch is split over both, large parameters over fsdp.
    mesh = ml_collections.ConfigDict()
    mesh.data = -1  # -1 = all devices not used by the other axis
    mesh.fsdp = 1
    # How a step computes its gradients: "jit" (XLA partitions the whole step by the shardings)
    # or "shard_map" (explicit per-device loss and gradients, averaged with pmean).
    mesh.train_step = "jit"
    # Device memory layouts of the train state: "auto" lets the compiler pick each array's layout
    # for the train step (e.g. convolution kernels in the order cuDNN's gradients come out, so the
    # optimizer update does not transpose them every step); "default" keeps row-major arrays.
    mesh.state_layouts = "auto"
    return mesh


def _distributed() -> ml_collections.ConfigDict:
    # Several processes (hosts of a TPU pod slice, GPU nodes): run the same command on each with
    # initialize=True. Empty/-1 values are auto-detected (Cloud TPU, SLURM, Open MPI); on plain
    # machines give the coordinator (process 0's host:port), the process count and each id.
    # auto_detect also initialises when a launcher started several processes (srun with several
    # tasks, mpirun, several TPU workers, JAX_COORDINATOR_ADDRESS), so that they never train as
    # separate runs into one workdir; False runs each process alone. timeout_s: how long a
    # process waits for all the others to join before JAX ends it.
    distributed = ml_collections.ConfigDict()
    distributed.initialize = False
    distributed.auto_detect = True
    distributed.coordinator_address = ""
    distributed.num_processes = -1
    distributed.process_id = -1
    distributed.timeout_s = 300
    return distributed
