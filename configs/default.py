"""The baseline's best recipe on the real DeepFashion folder (set config.data.data_dir)."""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0  # seeds initialisation, data order and augmentation
  # weights to start from: a baseline epoch_N.pth (whole model) or torchvision .pth (backbone),
  # or a pretrained name, downloaded once: 'torchvision:convnext_tiny' (docs/pretrained.md)
  config.init_from = ''
  config.dtype = 'float32'  # activations: float32 | bfloat16 | float16 (dynamic loss scale); params float32
  config.batch_size = 32  # global batch, split over processes and devices
  config.num_train_steps = 1_300_000  # the baseline's 200 epochs of 209,222 images at batch 32
  config.optimizer = 'adam'  # 'adam' (the baseline's) or 'sgd' (momentum)
  config.learning_rate = 2e-4  # peak learning rate
  config.adam_eps = 1e-8  # Adam's epsilon
  config.momentum = 0.9  # SGD momentum
  config.weight_decay = 0.0  # AdamW's decoupled decay / SGD's coupled L2 (baseline: none)
  # decay every parameter; by default 1-D ones (biases, norms, layer scales) and ViT
  # position embeddings and class tokens are left out (steps.decayed_parameters)
  config.decay_norms_and_biases = False
  # < 1 (e.g. 0.65, BEiT's and MAE's fine-tuning): layer-wise learning-rate decay, the rate
  # of a backbone layer k of n times layer_decay ** (n + 1 - k), the heads' untouched; 1: off
  config.layer_decay = 1.0
  config.schedule = 'constant'  # 'constant' (the baseline's), 'cosine' or 'step_decay'
  config.decay_rate = 0.8  # 'step_decay': the rate's factor every decay_every_steps
  config.decay_every_steps = 13_077  # 'step_decay': an epoch of 209,222 images at batch 16
  config.warmup_steps = 0  # linear warm-up from 0 to learning_rate
  config.grad_clip_norm = 0.0  # > 0: clip the gradient's global L2 norm to this (0: off)
  # > 0 (e.g. 0.999): also keep an exponential moving average of the weights and batch-norm
  # statistics, evaluated beside them (metrics `ema_*`); 0: off
  config.ema_decay = 0.0
  # > 1: split each batch into this many micro-batches, one optimiser step (1: off)
  config.grad_accum_steps = 1
  config.max_nonfinite_in_a_row = 25  # float16: stop after more skipped steps in a row
  config.log_every_steps = 100  # train metrics to TensorBoard and the console
  config.eval_every_steps = 10_000  # evaluate on config.eval.split (and at the end)
  config.checkpoint_every_steps = 10_000  # save (and at the end); a multiple of log_every_steps
  config.keep_checkpoints = 3  # the newest kept, besides the best by config.best_metric
  config.best_metric = 'category_top3'  # evaluation metric that names the best checkpoint
  config.num_box_images = 8  # validation images drawn with their boxes at each evaluation
  # (a, b): a jax.profiler trace of training steps a to b, both included, into
  # WORKDIR/profile (TensorBoard's profile plugin, Perfetto); (0, 0): off
  config.profile_steps = (0, 0)

  config.eval = ml_collections.ConfigDict()
  config.eval.split = 'val'  # 'val' or 'test'
  config.eval.batch_size = 64  # global evaluation batch
  config.eval.checkpoint = ''  # --mode=evaluate: '' newest, 'best', a step number, or 'all' kept
  config.eval.weights = 'raw'  # evaluate/predict: the trained 'raw' weights or their 'ema'
  config.eval.report = True  # --mode=evaluate: also write report_<split>_<step>.html
  config.eval.report_examples = 12  # the report's galleries: most confidently wrong, and right

  config.predict = ml_collections.ConfigDict()
  config.predict.ten_crop = True  # average ten crops (the baseline's), else one centre crop
  config.predict.temperature = 1.0  # category softmax temperature
  config.predict.top_k_attributes = 5  # attributes listed per type
  config.predict.batch_size = 16  # images per jitted batch

  config.export = ml_collections.ConfigDict()  # --mode=export (a SavedModel for serving)
  config.export.ten_crop = False  # one centre crop (10x cheaper), else predict's ten crops

  # FashionNet's keyword arguments (models/fashion_net.py), field for field; a field that
  # changes what a checkpoint's weights compute is named in fashion_net.CHANGES_MEANING.
  config.model = ml_collections.ConfigDict()
  # one of models/backbones.py's BACKBONES (docs/configs.md lists them)
  config.model.backbone = 'resnet18'
  config.model.roi_pool = 'align'  # 'align' (ROI-Align) or 'baseline_max' (the baseline's)
  config.model.roi_sampling_ratio = 2  # ROI-Align samples per bin and axis (<= 0: adaptive)
  config.model.roi_aligned = True  # ROI-Align's half-pixel alignment (torchvision `aligned`)
  config.model.box_gradient_into_roi = False  # let the local features train the box branch
  config.model.category_head = 'single'  # 'single' 50-way, or 'per_garment_type'
  config.model.dropout = 0.0  # dropout on the joined features before the heads (baseline: none)
  # 'fashionnet' (box branch, global + ROI-pooled local features) or 'liu_lu' (Liu & Lu
  # 2018: fully connected heads on the pooled last map, no box)
  config.model.heads = 'fashionnet'
  # 'none', 'heatmaps' (a landmark branch beside the heads) or 'attention' (Liu & Lu's
  # landmark-driven attention); both read VGG-16's conv4_3 or a ResNet's layer2
  config.model.landmarks = 'none'
  config.model.drop_path = 0.0  # ConvNeXt, ViT: stochastic depth's rate in the last block
  # ViT: the global feature: 'default' (the architecture's own: the class token for ViT and
  # CLIP, the attention-pooling head for SigLIP), 'token', 'mean' (of the patch tokens), 'map'
  config.model.global_pool = 'default'
  config.model.landmark_block = 0  # ViT: the block the landmark branch reads (0: the middle one)
  # 'all', or 'heads': the backbone frozen (a linear probe), in inference mode; the box
  # branch, the heads and any landmark branch and attention train
  config.model.trainable = 'all'

  config.loss = ml_collections.ConfigDict()  # losses.total_loss's keyword arguments
  config.loss.attribute = 'bce'  # 'bce', 'hinge' or 'two_way' (Liu & Lu's; heads='liu_lu')
  config.loss.reduce_sum = True  # sum attribute losses over attributes (baseline --reduce_sum)
  config.loss.pos_weights_scale = 0.0  # > 0: BCE weights positives by negatives/positives, max this
  config.loss.beta = 0.001  # weight of the box loss
  config.loss.category_weight = 1.0  # weight of the category loss (Liu & Lu: 1)
  config.loss.attribute_weight = 1.0  # weight of the attribute loss (Liu & Lu: 20)
  config.loss.two_way_negative_weight = 0.1  # attribute='two_way': negatives' weight (positives 1)
  config.loss.landmark_weight = 100.0  # weight of the landmark heatmap loss (Liu & Lu's)
  config.loss.landmark_heatmap = 'gaussian'  # target: 'gaussian' or 'liu_lu' (exp(-d / 2r))
  config.loss.landmark_radius = 16.0  # the target's r in input pixels (Liu & Lu: 16 at 224)

  config.data = ml_collections.ConfigDict()
  config.data.data_dir = ''  # DeepFashion folder holding Anno/, Eval/ and Img/ (or img/)
  config.data.cache_dir = ''  # parsed-annotation cache; '' = annotation_cache/ next to the workdir
  config.data.source = 'folder'  # images from the 'folder', or 'tfds' (prepared by --mode=prepare)
  config.data.tfds_dir = ''  # the prepared TFDS dataset; '' = tfds/ next to the workdir
  config.data.partition = 'official'  # 'official' partition, or 'baseline' (random 90/5/5, seed 0)
  config.data.synthetic_images = 0  # > 0 and data_dir empty: write a synthetic folder of this size
  config.data.synthetic_seed = 0  # seed of the synthetic folder
  config.data.synthetic_quirks = False  # add the real release's bad files to the synthetic folder
  config.data.img_size = 256  # training: resize to img_size x img_size, then ...
  config.data.crop_size = 224  # ... a random crop_size crop (and flip); the model's input side
  config.data.random_flip = True  # training: mirror half the crops (the baseline's; not Liu & Lu's)
  config.data.canvas_size = 300  # side of the uint8 canvas each decoded image is sent in
  config.data.eval_crop = 'resize'  # evaluation: 'resize' to crop_size (baseline) or 'center_crop'
  config.data.crop = 'none'  # first cut to: 'none' (whole image, baseline) or 'gt_box' (published)
  config.data.crop_margin = 10.0  # 'gt_box': pixels added to each side of the box (mmfashion's 10)
  # pixels: 'baseline' (x/255-0.5)/0.5, 'imagenet' or 'clip' mean/std (fashion_net.NORMALIZATIONS)
  config.data.normalization = 'baseline'
  config.data.strict = False  # raise on an unreadable image or an odd box/landmark row instead
  config.data.max_image_bytes = 32 * 2**20  # larger image files are refused unread (as unreadable)
  config.data.max_image_pixels = 50_000_000  # more pixels (from the header): refused undecoded
  config.data.threads = 2  # decoding threads per process (libjpeg-turbo releases the GIL)
  config.data.processes = 0  # grain worker processes (0: decode in the main process)
  return config
