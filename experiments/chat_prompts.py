"""The 32 chat prompts of the greedy-agreement measurements (experiments/smollm2_table.py) and of
benchmarks/generate_batch.py: short factual, language and arithmetic user questions, one turn each."""

QUESTIONS = [
    "What is the capital of France?", "Name three primary colors.", "What is 2 + 2?", "Who wrote Hamlet?",
    "Why is the sky blue?", "Give me a synonym for happy.", "What do bees make?", "How many legs does a spider have?",
    "What is the boiling point of water?", "Translate 'thank you' into Spanish.", "What is photosynthesis?",
    "Suggest a name for a cat.", "What is the largest planet?", "Write a haiku about rain.", "What is gravity?",
    "List two fruits that are red.", "Who painted the Mona Lisa?", "What language is spoken in Brazil?",
    "How do I boil an egg?", "What is the opposite of cold?", "Explain what a noun is.", "What is 10 times 12?",
    "Name a famous scientist.", "What is the tallest animal?", "Why do leaves change color?",
    "What is the square root of 81?", "Tell me a fun fact about octopuses.", "What is the speed of light?",
    "Which ocean is the largest?", "What is a prime number?", "How many days are in a leap year?",
    "What is the chemical symbol for gold?",
]
