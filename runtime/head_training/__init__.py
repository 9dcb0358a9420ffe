"""Exit heads for a base model, by self-distillation (base model frozen).

``train_heads(out, model=..., ...)`` runs the whole pipeline and writes ``heads.safetensors``
+ ``manifest.json`` (the format of runtime/exit_heads.py). Its steps, one module each:

1. collect.py      the base model answers every prompt greedily, keeping the hidden states
                   that produced each new token;
2. vocab.py        the restricted vocabulary the heads score (the K most frequent outputs);
3. train.py        each head fitted on KL(final || head) over the generated tokens: the final
                   layer's distribution is the teacher, ``lm_head(final_norm(f_l(h_l)))`` the
                   student (Adam, warmup + cosine); ``f_l`` is ``T_l h`` (``head_type`` linear,
                   d x d, identity at start) or ``T_l h`` plus a small MLP (mlp, families.MLPHead,
                   starting as the linear head), the math of runtime/exit_heads.py;
4. calibrate.py    each head's confidence and agreement with the final layer on prompts it
                   never trained on, and the exit-rate / precision table per threshold;
5. the default layers and thresholds: the runtime's own per-setting head choice
                   (runtime/sim/heads.py) for ``defaults_for`` ranks, on the validation outcomes.

pipeline.py wires them together and writes the manifest. ``adadecode train-heads``
(launcher/train_heads.py) is the command-line face of ``train_heads``.
``recompute_outcomes(out, ...)`` (``train-heads --outcomes-only``) runs steps 1, 4 and 5 for heads
already in ``out`` without training them: the per-token outcomes, the validation calibration
and the defaults, by the same code.

Data: the training prompts minus every ``val_every``-th one (the validation prompts, never
trained on, on which the defaults are chosen, with all prompts of any ``validation_extra`` files:
validation.py); the held-out prompts are only ever evaluated
(the calibration table), never fitted on (data/prompts/README.md).

Devices: the base model runs on ``device`` in ``dtype`` (auto: cuda:0 and bfloat16 when CUDA
exists, else the CPU in float32). Its hidden states stay there; the heads train there in
float32 (the states and the teacher cast to float32). The host sees per-token values once,
for the calibration table.
"""

from .pipeline import recompute_outcomes, train_heads

__all__ = ["recompute_outcomes", "train_heads"]
