"""The network (timm backbone -> GeM -> neck -> unit vector), its checkpoints and transforms,
and embedding images with it: what training and answering share."""
