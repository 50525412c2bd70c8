"""glm-infill: offline blank infilling with the original GLM models on Ray and vLLM."""
