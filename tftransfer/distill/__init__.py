"""Knowledge distillation: teacher (or ensemble) -> smaller student.

Built on `keras.distillation` (Keras >= 3.12): `Distiller` subclasses
`keras.distillation.Distiller`, hints use `keras.distillation.
FeatureDistillation`. What tftransfer adds: dict (`{head: logits}`) outputs,
alpha / temperature as variables moved by `DistillationSchedule`, cached
teacher outputs, teacher ensembles, input-compatibility checks, and
`python -m tftransfer.distill` (see `__main__.py` and README.md, "Knowledge distillation").

Library use (no config needed):

```python
teacher = tftransfer.distill.load_teacher(["runs/teacher"])
distiller = tftransfer.distill.Distiller(teacher.model, student, heads, alpha=0.1, temperature=4.0)
distiller.compile(keras.optimizers.Adam(1e-3), metrics={"label": ["accuracy"]})
distiller.fit(train_ds, epochs=3, callbacks=[tftransfer.distill.DistillationSchedule(...)])
```
"""

from tftransfer.distill.cache import cached_pipeline, load_or_compute, teacher_outputs
from tftransfer.distill.distiller import Distiller, HintonDistillation
from tftransfer.distill.init import init_from_teacher
from tftransfer.distill.report import compare, latency_per_example
from tftransfer.distill.schedule import DistillationSchedule, schedule_value
from tftransfer.distill.teacher import Teacher, check_compatible, ensemble, load_teacher

__all__ = [
    "DistillationSchedule",
    "Distiller",
    "HintonDistillation",
    "Teacher",
    "cached_pipeline",
    "check_compatible",
    "compare",
    "ensemble",
    "init_from_teacher",
    "latency_per_example",
    "load_or_compute",
    "load_teacher",
    "schedule_value",
    "teacher_outputs",
]
