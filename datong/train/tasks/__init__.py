"""Objectives for the engine, one module per family: each holds its tasks'
configs, data (sources, preprocessing), evaluation and probes.

* ``text``: GPT (causal LM), BERT (masked LM); packing, tokenizer specs.
* ``vision``: image classification / fine-tuning, MAE, SimMIM.
* ``images``: image preprocessing and augmentation shared by the above and CLIP.
* ``probes``: linear probe and k-NN on frozen features of any image encoder.
* ``clip``: CLIP / SigLIP / LiT.

Models and their pure losses live below, in ``datong.unimodal`` and
``datong.multimodal``; the engine (``datong.train.loop``) knows only the
``Task`` contract (``datong.train.task``).
"""
