"""PEFT adapter folders, both ways: read what ``peft.PeftModel.save_pretrained`` writes, write
what ``peft.PeftModel.from_pretrained`` loads.  PEFT itself is never imported: the files are
read and written here, safetensors only (a pickled ``adapter_model.bin`` is refused).

PEFT's folder is ``adapter_config.json`` (``peft_type``, ``r``, ``target_modules``, ...) and
``adapter_model.safetensors`` whose keys are ``base_model.model.<layer path>.<tensor>`` (the
adapter name dropped).  What maps to what:

=============================================  ===============================================
PEFT                                           moracl
=============================================  ===============================================
``LORA`` ``r``, ``lora_alpha``                 ``LoRAConfig(rank, alpha)``
``use_rslora``                                 ``rslora=True``
``use_dora``                                   ``DoRAConfig`` (same fields)
``lora_dropout`` / ``vera_dropout``            ``dropout``
``VERA`` ``r``, ``d_initial``                  ``VeRAConfig(rank, d_initial)``
``ADALORA`` ``init_r``, ``target_r``,          ``AdaLoRAConfig(rank, target_rank, alpha)``,
``lora_alpha``, ``rank_pattern``               each layer rebuilt at the rank it kept
``lora_A`` / ``lora_E`` / ``lora_B`` (AdaLoRA)  AdaLoRA's ``P``, ``Λ``, ``Q`` (kept triplets)
``lora_A.weight`` ``(r, i)``                   ``lora_A``
``lora_B.weight`` ``(o, r)``                   ``lora_B``
``lora_magnitude_vector`` ``(o,)``             DoRA's ``magnitude``
``vera_lambda_d`` ``(r,)``, ``vera_lambda_b``  VeRA's ``lambda_d``, ``lambda_b``
``base_model.vera_A`` / ``vera_B`` (shared)    each layer's ``vera_A``/``vera_B``: the slices
                                               ``A[:, :i]``, ``B[:o]`` PEFT uses
``modules_to_save``                            ``modules_to_save`` (trained copies)
``fan_in_fan_out`` (GPT-2 ``Conv1D``)          found from the layer itself
=============================================  ===============================================

PEFT's VeRA shares one ``A (r × max i)`` and ``B (max o × r)`` over every target layer and
slices them; moracl's VeRA draws one projection per layer shape from ``projection_seed``.
Loading a PEFT VeRA adapter therefore sets each layer's projections to PEFT's slices (read
from the file when ``save_projection`` put them there, else regenerated from
``projection_prng_key`` exactly as PEFT draws them); such an adapter is written back in
PEFT's format (moracl's own cannot carry the projections).  Writing a moracl VeRA adapter in
PEFT's format needs its projections to be slices of one shared pair (target layers of one
input size; the up projections always are).

Refused, each with a ``ValueError`` naming the value: other ``peft_type``s, ``bias`` other
than ``"none"``, ``rank_pattern``/``alpha_pattern`` giving layers different ranks or scales
(one moracl adapter has one config), layer selection by ``layers_to_transform``, LoRA on
embeddings or convolutions, initialisations that rewrite the base weights (PiSSA, OLoRA,
LoftQ, CorDA, LoRA-GA: convert them in PEFT first), and any other PEFT option set to a
non-default value.  Writing refuses MoRA adapters and mixtures, except one task's update of
a task-routed mixture (``task_id``; :mod:`moracl.experts.export`).

The folder's names and matching rules are in :mod:`moracl.peft_layout`, its config's fields in
:mod:`moracl.peft_config`, reading in :mod:`moracl.peft_read` and writing in
:mod:`moracl.peft_write`; every public name is importable from here.

Shape legend: ``r`` rank, ``i``/``o`` layer input/output sizes.
"""

from __future__ import annotations

from moracl.peft_config import BASE_REWRITING_INITS as BASE_REWRITING_INITS
from moracl.peft_config import COMMON as COMMON
from moracl.peft_config import READ as READ
from moracl.peft_layout import (
    PEFT_CONFIG_NAME,
    SUPPORTED_PEFT_TYPES,
    AdaptedModel,
    FolderFormat,
    folder_format,
)
from moracl.peft_layout import PICKLE_NAME as PICKLE_NAME
from moracl.peft_layout import PREFIX as PREFIX
from moracl.peft_layout import SUFFIXES as SUFFIXES
from moracl.peft_layout import VERA_SHARED as VERA_SHARED
from moracl.peft_layout import exact_pattern as exact_pattern
from moracl.peft_read import PeftAdapter, load_adapter_folder, peft_vera_projections, read_peft
from moracl.peft_read import set_vera_projections as set_vera_projections
from moracl.peft_write import check_moracl_representable as check_moracl_representable
from moracl.peft_write import save_peft, write_lora_folder

__all__ = [
    "PEFT_CONFIG_NAME",
    "SUPPORTED_PEFT_TYPES",
    "AdaptedModel",
    "FolderFormat",
    "PeftAdapter",
    "folder_format",
    "load_adapter_folder",
    "peft_vera_projections",
    "read_peft",
    "save_peft",
    "write_lora_folder",
]
