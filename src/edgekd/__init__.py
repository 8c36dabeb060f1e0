"""edgekd: ensemble knowledge distillation into tiny MobileNetV3 students, with INT8 QAT and ONNX export."""
