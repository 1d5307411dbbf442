"""Public weights in: one parameter-mapping table per source family.

Each family module is essentially a table (`mapping.Table`) from the source's
tensor names and layouts to this project's frozen weights, with the layout
changes as small named functions (`transforms.py`). What every converter shares:

* `sources.py`  reads tensors lazily, one at a time: safetensors (also sharded,
  `*.safetensors.index.json`) and torch `.bin`/`.pt` state dicts through
  `torch.load(weights_only=True, mmap=True)`, never unpickling code;
* `mapping.py`  checks a table against the source and our model before anything
  is read (missing, unexpected, wrongly shaped tensors) and produces our weights
  tensor by tensor, stacking per-layer tensors on the leading 'layers' axis;
* `writer.py`   writes them as the orbax backbone checkpoint that
  `config.backbones.*` names (`core/backbones.py`'s layout), in bounded memory
  and atomically, with the model-config fields read from the source beside it.

Vision families: `timm_nfnet.py` (DeepMind's NFNets as timm ships them),
`open_clip_vit.py` (open_clip's `VisionTransformer`), `hf_clip.py` (Hugging
Face `CLIPVisionModel` / `CLIPModel`); `vision.py` runs them. Decoder families,
picked by the Hugging Face config.json: `hf_llama.py` (LLaMA 2/3, Mistral),
`hf_gpt_neox.py` (Pythia, RedPajama-INCITE), `hf_mpt.py` (MPT); `decoder.py` runs
them. The command line: `python -m flamingo_jax.convert {vision,decoder}`.
"""
