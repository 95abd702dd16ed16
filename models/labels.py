"""Class labels as the backbones take them: int indices [B] or float one-hot / soft rows [B, label_dim]; None is the
null label (the all-zero row), which label dropout trains for classifier-free guidance."""
import torch
import torch.nn.functional as F


def label_rows(class_labels, batch, label_dim, device, label_dropout=0.0, training=False):
    """Float labels [B, label_dim] (None -> zeros); in training, each row is replaced by the null label with
    probability `label_dropout`. Anything else is a one-line ValueError."""
    if class_labels is None:
        labels = torch.zeros(batch, label_dim, device=device)
    elif class_labels.dtype in (torch.int64, torch.int32) and class_labels.shape == (batch,):
        # checked where it costs no device sync and no graph break (eager CPU); entry points check ids too
        checkable = batch and not class_labels.is_cuda and not torch.compiler.is_compiling()
        if checkable and not bool(((class_labels >= 0) & (class_labels < label_dim)).all()):
            raise ValueError(f"class ids must lie in 0..{label_dim - 1}; got {sorted(set(class_labels.tolist()))[:8]}")
        labels = F.one_hot(class_labels.long(), label_dim).float()
    elif class_labels.is_floating_point() and class_labels.shape == (batch, label_dim):
        labels = class_labels.float()
    else:
        raise ValueError(f"class_labels must be int indices [{batch}] or float [{batch}, {label_dim}]; "
                         f"got {class_labels.dtype} {list(class_labels.shape)}")
    if training and label_dropout > 0:
        keep = torch.rand(batch, 1, device=device) >= label_dropout
        labels = labels * keep
    return labels
