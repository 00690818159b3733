"""Classification: the distillation loss (alpha CE + (1 - alpha) T^2 KL) on cached soft
labels."""
