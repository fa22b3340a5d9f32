"""Model core: ESM-2 and AMPLIFY encoders on shared building blocks."""
