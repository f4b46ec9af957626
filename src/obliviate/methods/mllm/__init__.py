"""Vision-language methods that need pictures: each one file with its config, formula and paper. Every
language-model method (methods/lm/) also runs on vision-language models, through the vision-language adapter."""
