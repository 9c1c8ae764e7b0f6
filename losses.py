"""DeiT's distillation loss: none / soft / hard, on top of a base classification criterion."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class DistillationLoss(nn.Module):
    """``(1 - alpha) * base(cls_logits, targets) + alpha * distill(dist_logits, teacher(inputs))``.

    - ``none``: the base loss only (a model returning ``(cls, dist)`` is scored on ``cls``).
    - ``soft``: KL(log_softmax(dist / tau) || log_softmax(teacher / tau)) * tau^2, summed and divided by the number of
      logits, exactly as DeiT (kept for parity with published runs; see deit#61).
    - ``hard``: cross-entropy between ``dist`` and the teacher's arg-max, no label smoothing.

    The teacher runs in eval mode under ``no_grad`` on the same (mixed-up) inputs and under the caller's autocast.
    """

    def __init__(self, base_criterion: nn.Module, teacher_model: nn.Module = None, distillation_type: str = 'none',
                 alpha: float = 0.5, tau: float = 1.0):
        super().__init__()
        if distillation_type not in ('none', 'soft', 'hard'):
            raise ValueError(f"distillation_type must be none, soft or hard, got '{distillation_type}'")
        if distillation_type != 'none' and teacher_model is None:
            raise ValueError(f'distillation_type={distillation_type} needs a teacher model')
        self.base_criterion = base_criterion
        self.teacher_model = teacher_model
        self.distillation_type = distillation_type
        self.alpha = alpha
        self.tau = tau

    def forward(self, inputs: torch.Tensor, outputs, targets: torch.Tensor) -> torch.Tensor:
        outputs_kd = None
        if not isinstance(outputs, torch.Tensor):
            outputs, outputs_kd = outputs  # (cls logits, distillation-token logits)
        base_loss = self.base_criterion(outputs, targets)
        if self.distillation_type == 'none':
            return base_loss
        if outputs_kd is None:
            raise ValueError('distillation needs a model with a distillation head returning (cls, dist) in training, '
                             'e.g. pit_s_distilled')
        with torch.no_grad():
            teacher_outputs = self.teacher_model(inputs)
        if self.distillation_type == 'soft':
            T = self.tau
            distillation_loss = F.kl_div(
                F.log_softmax(outputs_kd / T, dim=1), F.log_softmax(teacher_outputs / T, dim=1),
                reduction='sum', log_target=True) * (T * T) / outputs_kd.numel()
        else:
            distillation_loss = F.cross_entropy(outputs_kd, teacher_outputs.argmax(dim=1))
        return base_loss * (1 - self.alpha) + distillation_loss * self.alpha
