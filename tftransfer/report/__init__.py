"""Evaluation report: metrics from predictions, figures (matplotlib, Agg), report.md.

    python -m tftransfer.evaluate --workdir=W      # writes W/report/report.md + PNGs

Library use (no config needed):

```python
from tftransfer import report
m = report.classification_metrics(labels, probabilities, class_names)
m["macro_f1"], m["ece"], m["confusion_matrix"]
```
"""

from tftransfer.report.history import read_history, stage_changes
from tftransfer.report.metrics import (
    calibration,
    classification_metrics,
    most_confused,
    multilabel_metrics,
    regression_metrics,
    top_losses,
)
