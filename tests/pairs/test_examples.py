"""The example scorers in qsimpo/pairs/examples.py: each instruction checker (followed / not followed), finding the
instructions in a prompt, the score with its penalties, and the error for a prompt with none."""

from __future__ import annotations

import pytest

from qsimpo.errors import UsageError
from qsimpo.pairs.examples import (BY_NAME, CONFLICTS, CUT_PENALTY, INSTRUCTIONS, OFF_TOPIC_PENALTY, check_instructions,
                                   find_instructions, finished, follows_instructions, follows_instructions_batch, on_topic,
                                   topic_stems, words)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# (instruction, parameter, an answer that follows it, one that does not)
CASES = [
    ("max_words", "5", "Rain is falling water.", "Rain is water that falls from clouds."),
    ("max_words", "3", "- Rain - falls.", "Rain falls from clouds."),  # list dashes are not words
    ("bullets", "3", "Tips:\n- Sleep.\n- Eat well.\n  - Walk daily.", "- Sleep.\n- Eat well."),
    ("bullets", "2", "- one\n- two", "- one\n- two\n- three"),
    ("bullets", "2", "- one\n- two", "-one\n-two"),  # a dash without its space is no bullet
    ("end_word", "Done", "Boil the water, then add pasta. Done.", "Done. Boil the water, then add pasta."),
    ("end_word", "Done", 'Boil it. done!"', "Boil it. Doneness matters."),
    ("start_word", "Sure", "Sure, here is how.", "Here is how, sure."),
    ("start_word", "Sure", '"Sure! Here is how."', "Surely here is how."),
    ("lowercase", None, "rain is water falling from clouds.", "Rain is water falling from clouds."),
    ("lowercase", None, "rain is water.", "123 456."),  # no letters at all is not lowercase writing
    ("include_word", "because", "It rains because clouds cool.", "It rains since clouds cool."),
    ("include_word", "because", "Because clouds cool.", "It rains becausee clouds cool."),
    ("exclude_word", "the", "Clouds cool and rain falls.", "The clouds cool."),
    ("exclude_word", "the", "They cool there, then rain.", "Clouds cool; the rain falls."),
    ("no_commas", None, "Clouds cool and rain falls.", "Clouds cool, and rain falls."),
    ("quoted", None, '"Clouds cool and rain falls."', 'Clouds cool and "rain" falls.'),
    ("quoted", None, "“Clouds cool.”", '"'),
]


@pytest.mark.parametrize("name,value,follows,violates", CASES)
def test_each_checker_tells_followed_from_not(name, value, follows, violates):
    check = BY_NAME[name].check
    assert check(follows, value) is True
    assert check(violates, value) is False


def test_every_instruction_is_found_in_its_own_phrasing_with_its_parameter():
    for instruction in INSTRUCTIONS:
        for value in instruction.values or (None,):
            text = f"How do I boil an egg? {instruction.phrase(value)}"
            found = find_instructions(text)
            assert [(i.name, v) for i, v in found] == [(instruction.name, None if value is None else str(value))]
            assert find_instructions(text.upper())[0][0] is instruction  # case is ignored


def test_two_instructions_are_both_found_and_checked():
    prompt = user("Why do leaves fall? Answer in at most 10 words. Do not use any commas.")
    assert [i.name for i, _ in find_instructions(prompt[0]["content"])] == ["max_words", "no_commas"]
    assert check_instructions(prompt, "Leaves fall to save water in winter.") == {"max_words": True, "no_commas": True}
    assert check_instructions(prompt, "Trees, to save water, drop leaves.") == {"max_words": True, "no_commas": False}
    assert follows_instructions(prompt, "Leaves fall to save water in winter.") == 1.0
    assert follows_instructions(prompt, "Trees, to save water, drop leaves.") == 0.5
    long = "Trees drop their leaves in autumn so that they lose less water over the cold winter."
    assert follows_instructions(prompt, long) == 0.5
    assert follows_instructions(prompt, "Trees, to save water in the cold, drop all their old leaves each") == 0.0 - CUT_PENALTY
    assert follows_instructions(prompt, "Trees save water in winter.") == 1.0 - OFF_TOPIC_PENALTY  # no word of the question


def test_the_instructions_are_read_from_the_last_user_message():
    prompt = [{"role": "system", "content": "Do not use any commas."}, {"role": "user", "content": "Answer in at most 3 words."},
              {"role": "assistant", "content": "Fine."}, {"role": "user", "content": "Name a fruit. Include the word 'red'."}]
    assert check_instructions(prompt, "A red apple.") == {"include_word": True}


def test_a_prompt_without_a_known_instruction_is_a_clear_error():
    with pytest.raises(UsageError, match=r"the prompt 'Why is the sky blue\?' carries none of the instructions.*"
                                         r"'Answer in at most 25 words\.'.*INSTRUCTIONS"):
        follows_instructions(user("Why is the sky blue?"), "Scattering.")
    with pytest.raises(UsageError, match="carries none"):
        follows_instructions_batch([user("Answer briefly.")], ["Yes."])
    with pytest.raises(UsageError, match=r"'x{77}\.\.\.'"):  # a long prompt is shortened in the message
        check_instructions(user("x" * 200), "y")


def test_empty_and_too_short_answers_score_minus_one():
    prompt = user("How do I boil an egg? End your answer with the word Done. Do not use any commas.")
    assert follows_instructions(prompt, "") == -1.0
    assert follows_instructions(prompt, "   ") == -1.0
    assert follows_instructions(prompt, "Done.") == -1.0  # follows both, answers nothing
    assert follows_instructions(prompt, "Boil it. Done") == 1.0  # the asked-for last word ends the answer


def test_an_answer_cut_mid_sentence_loses_the_penalty():
    prompt = user("How do I boil an egg? Write your answer in lowercase letters only.")
    assert follows_instructions(prompt, "put the egg in boiling water for eight minutes.") == 1.0
    assert follows_instructions(prompt, "put the egg in boiling water for eight") == 1.0 - CUT_PENALTY
    assert finished("- one\n- two") and finished('"Boil it"') and finished("Boil it (gently).")
    assert not finished("Boil it and") and not finished("")
    assert not finished("Boil it. Done", user("Boil? End your answer with the word Thanks."))


def test_an_answer_without_a_word_of_the_question_loses_the_topic_penalty():
    prompt = user("Why do cats purr? Do not use any commas. Include the word 'because'.")
    assert topic_stems(prompt[0]["content"]) == {"cats", "purr"}  # not "because", "commas": instructions are not the topic
    assert on_topic(prompt, "Purring is how a cat shows it is calm.")  # the same first four letters
    assert not on_topic(prompt, "I can help you with that because I am here.")
    assert follows_instructions(prompt, "Cats purr because they are calm.") == 1.0
    assert follows_instructions(prompt, "I can help you with that because I am here.") == 1.0 - OFF_TOPIC_PENALTY
    assert follows_instructions(prompt, "I can help you with that, it is") == 0.0 - CUT_PENALTY - OFF_TOPIC_PENALTY
    assert topic_stems("What are some good ways to keep warm? Answer in at most 20 words.") == {"warm"}
    assert on_topic(user("How do I make a cup of tea properly? Do not use any commas."), "Anything at all.")  # no topic word


def test_batch_form_equals_one_at_a_time():
    prompts = [user("Name a tree. Answer with exactly 2 bullet points starting with '- '."),
               user("Name a tree. Start your answer with the word Well.")]
    answers = ["- Oak is a tall tree.\n- Pine is green.", "Oak is a tree."]
    assert follows_instructions_batch(prompts, answers) == [follows_instructions(p, a) for p, a in zip(prompts, answers)]
    assert follows_instructions_batch(prompts, answers) == [1.0, 0.0]
    assert follows_instructions_batch.batched is True


def test_words_and_registry():
    assert words("- It's a well-known fact, 42 times!") == ["It's", "a", "well-known", "fact", "42", "times"]
    assert len({i.name for i in INSTRUCTIONS}) == len(INSTRUCTIONS)
    for pair in CONFLICTS:
        assert pair <= set(BY_NAME)
    include, exclude = BY_NAME["include_word"].values, BY_NAME["exclude_word"].values
    assert not set(include) & set(exclude)  # a prompt may ask for both without asking for the impossible
