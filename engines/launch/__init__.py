"""Engines whose workers the gateway launches (vLLM, LMDeploy): options and command lines
(`command`), process supervision (`supervisor`), the shared engine (`engine`), and one
module per engine's flag mapping (`vllm`, `lmdeploy`)."""
