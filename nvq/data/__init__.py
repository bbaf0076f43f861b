"""Data files shipped with nvq.

* `prompts.txt`: the default verification prompts (famous opening lines, public domain).
* `calibration.txt`: the default GPTQ calibration corpus, public-domain text only: Lewis Carroll's
  "Alice's Adventures in Wonderland" (Project Gutenberg EBook #11, without the Project Gutenberg
  header and license) followed by the Constitution of the United States. It shares no text with
  `prompts.txt`, so verification runs on text calibration did not see.
"""
