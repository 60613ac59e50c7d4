"""whale-id style image retrieval: learn an embedding, find who a photo shows or say "new_whale".

Modules, one concern each:
  data      reading a labelled gallery (folder per identity or Kaggle CSV) and the seeded splits
  transforms  albumentations pipelines built from the model's stored preprocessing
  pretrained  offline ImageNet weights for the default backbone
  model     timm backbone -> GeM -> embedding neck -> L2-normalised vector
  losses    metric-learning losses and miners from pytorch-metric-learning, by name
  embed     images -> embeddings (batched, DataLoader)
  metrics   MAP@5, Recall@K, MAP@R and the new_whale threshold calibration
  train     the training loop (single process or torchrun/DDP), checkpoints
  protocol  the whale protocol evaluation with its reference points
"""

NEW_WHALE = "new_whale"
