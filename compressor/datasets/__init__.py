"""Dataset readers and generators for the detection and segmentation tasks (COCO, YOLO, mask folders; the
Fashion-MNIST scenes sample)."""
