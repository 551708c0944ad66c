"""A thin DN-DETR on dnops: the model, its training, evaluation, export and prediction commands, and an embedded
COCO-format digits dataset with its loader."""
