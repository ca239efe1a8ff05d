# GPU image: NGC PyTorch ships CUDA, NCCL, NVIDIA apex and Transformer Engine.
FROM nvcr.io/nvidia/pytorch:25.09-py3

WORKDIR /workspace/megatron-latent
COPY . .
# torch, apex and TE come from the base image; pip keeps them (torch>=2.6 is already satisfied).
RUN pip install --no-cache-dir -e ".[hf,eval,test]"

CMD ["bash"]
