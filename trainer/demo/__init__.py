"""``selkd-demo``: the whole selective-distillation story on one CPU, from nothing to a report.

Why a demo needs this much machinery: distillation only means something when the teacher is clearly
better than the student would be without it, and when every compared method starts from the same
capable student and sees the same data. So the demo

1. takes a corpus (the running interpreter's standard library by default: real text that exists on
   every machine, nothing downloaded; ``--data`` for your own text) and splits it into the KD corpus
   (the caches and the students use it; its held-out split is the cache's eval split) and extra text
   that only pretraining sees;
2. trains a byte-level BPE tokenizer, a Llama-style teacher and the *base student* (the student
   architecture pretrained with plain CE to near its plateau, so that what KD adds to it means
   something), all with time budgets, and keeps them as Hugging Face directories under ``--models``
   (default ``~/.cache/selkd``), keyed by the corpus and the settings, so later runs reuse them.
   Neither ever sees a held-out sequence;
3. builds two caches with ``selkd-cache build`` (``sample:50``: every sequence, and the top 20% of
   sequences by the base student's entropy);
4. continues the base student for the same number of steps on the same data with each method: CE
   only, full KD with the teacher online, full KD from the cache, SE-KD (student entropy, 20% of
   positions) and SE-KD 3X (positions + sampled classes + 20% of samples);
5. scores the teacher, the base student and every trained student on the same held-out sequences
   and writes into ``--out`` one table (held-out CE at equal steps and at equal wall time, see
   :mod:`.reading`), a plain reading of it generated from its numbers, ``report.md`` and the plots
   (:mod:`.plots`, including which tokens of a held-out passage SE-KD selects).

The cache builds and trainings run in this process through the same functions as ``selkd-cache
build`` and ``selkd-train`` (one Python start-up instead of six, which matters on 2 cores); the demo
prints the equivalent command of each. Every stage reuses its earlier result when its inputs are
identical; ``--rerun`` retrains the compared students.

Budgets: the teacher and the base student train for a number of *seconds*, the compared students for
a number of *steps* (the same for all). The base student trains first, and its step time tells how fast
the machine is: on one slower than the 2 shared cores the budgets were sized on, the KD steps shrink in
proportion (:func:`plan_kd_steps`) and, if the run is still late, the teacher's seconds a little, so the
first run keeps its wall time and the teacher keeps its lead over the CE-only student.

The CE-only baseline is ``selkd-train --kd-weight 0 --ce-weight 1 --select none`` on the full cache: the
same batches in the same order as the cache-based KD runs, with the teacher's targets read and unused.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from selkd.trainer.demo.cli import build_parser, main

# public name -> its module, imported on first use (PEP 562) so that `selkd-demo --help` (which
# imports this package first) does not pay for torch and transformers
_LAZY = {
    "BUDGETS": "settings",
    "CHUNK_CHARS": "settings",
    "STDLIB_EXCLUDED_DIRS": "settings",
    "Budget": "settings",
    "DemoResult": "report",
    "Row": "report",
    "Shape": "settings",
    "chunk_text": "corpus",
    "format_table": "report",
    "plan_kd_steps": "settings",
    "run_demo": "run",
    "split_documents": "corpus",
    "stdlib_documents": "corpus",
    "user_documents": "corpus",
}

if TYPE_CHECKING:
    from selkd.trainer.demo.corpus import chunk_text, split_documents, stdlib_documents, user_documents
    from selkd.trainer.demo.report import DemoResult, Row, format_table
    from selkd.trainer.demo.run import run_demo
    from selkd.trainer.demo.settings import BUDGETS, CHUNK_CHARS, STDLIB_EXCLUDED_DIRS, Budget, Shape, plan_kd_steps

__all__ = [
    "BUDGETS",
    "CHUNK_CHARS",
    "STDLIB_EXCLUDED_DIRS",
    "Budget",
    "DemoResult",
    "Row",
    "Shape",
    "build_parser",
    "chunk_text",
    "format_table",
    "main",
    "plan_kd_steps",
    "run_demo",
    "split_documents",
    "stdlib_documents",
    "user_documents",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'selkd.trainer.demo' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"selkd.trainer.demo.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
