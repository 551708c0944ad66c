"""A thin DN-DETR on dnops (issue #6, in progress): so far the embedded COCO-format digits dataset and loader."""
