"""A small built-in set of easy general-knowledge questions, for smoke runs of real small models
(configs/smollm2.py) when no QA file is given. Not a benchmark."""

from __future__ import annotations

import json
import os

QUESTIONS = [
    ("What is the capital of France?", ["Paris"]),
    ("What is the capital of Japan?", ["Tokyo"]),
    ("What is the capital of Italy?", ["Rome"]),
    ("What is the capital of Germany?", ["Berlin"]),
    ("What is the capital of Spain?", ["Madrid"]),
    ("What is the capital of Egypt?", ["Cairo"]),
    ("What is the capital of Canada?", ["Ottawa"]),
    ("What is the capital of Australia?", ["Canberra"]),
    ("Who wrote Romeo and Juliet?", ["William Shakespeare", "Shakespeare"]),
    ("Who painted the Mona Lisa?", ["Leonardo da Vinci", "da Vinci"]),
    ("Who developed the theory of relativity?", ["Albert Einstein", "Einstein"]),
    ("Who was the first president of the United States?", ["George Washington"]),
    ("What is the largest planet in the solar system?", ["Jupiter"]),
    ("What planet is known as the red planet?", ["Mars"]),
    ("What is the chemical symbol for gold?", ["Au"]),
    ("What gas do plants absorb from the air?", ["carbon dioxide", "CO2"]),
    ("How many continents are there?", ["seven", "7"]),
    ("What is the largest ocean on Earth?", ["Pacific Ocean", "Pacific"]),
    ("What is the longest river in Africa?", ["Nile", "Nile River"]),
    ("In which country are the pyramids of Giza?", ["Egypt"]),
    ("What language is spoken in Brazil?", ["Portuguese"]),
    ("What is the currency of Japan?", ["yen", "Japanese yen"]),
    ("What is the boiling point of water in Celsius?", ["100", "100 degrees"]),
    ("Which animal is known as the king of the jungle?", ["lion"]),
    ("What is the tallest mountain in the world?", ["Mount Everest", "Everest"]),
    ("Who discovered penicillin?", ["Alexander Fleming", "Fleming"]),
    ("What is the hardest natural substance?", ["diamond"]),
    ("What is the smallest prime number?", ["2", "two"]),
    ("Which country gifted the Statue of Liberty to the United States?", ["France"]),
    ("What is the main ingredient of guacamole?", ["avocado"]),
    ("How many legs does a spider have?", ["eight", "8"]),
    ("What is the freezing point of water in Fahrenheit?", ["32", "32 degrees"]),
]


def write_jsonl(path: str) -> str:
    """Writes the questions as `{id, question, golden_answers}` rows; returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for i, (q, a) in enumerate(QUESTIONS):
            f.write(json.dumps({"id": str(i), "question": q, "golden_answers": a}) + "\n")
    return path
