"""Trivia questions for the quiz host, as (question, answer) pairs.

Answers are written the way they would be said out loud, since the host reads them
to itself and then judges a spoken reply. Keep every question answerable in a few
words and free of anything that needs to be seen (maps, pictures, spellings).
"""

TRIVIA_QUESTIONS: list[tuple[str, str]] = [
    ("What is the largest planet in our solar system?", "Jupiter"),
    ("How many legs does a spider have?", "eight"),
    ("Which ocean lies between Africa and Australia?", "the Indian Ocean"),
    ("What gas do plants take in from the air to make their food?", "carbon dioxide"),
    ("What is the capital city of Canada?", "Ottawa"),
    ("Who wrote the play Romeo and Juliet?", "William Shakespeare"),
    ("What is the hardest natural substance on Earth?", "diamond"),
    ("How many minutes are there in a full day?", "one thousand four hundred and forty"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("What is the chemical symbol for gold?", "A U"),
    ("In which country would you find the ancient city of Machu Picchu?", "Peru"),
    ("What is the longest river in South America?", "the Amazon"),
    ("Which instrument has eighty-eight keys?", "the piano"),
    ("What do bees collect from flowers to make honey?", "nectar"),
    ("Which metal is liquid at room temperature?", "mercury"),
    ("How many players does a football team, soccer that is, have on the field?", "eleven"),
    ("What is the smallest prime number?", "two"),
    ("Which language has the most native speakers in the world?", "Mandarin Chinese"),
    ("What is the name of the galaxy we live in?", "the Milky Way"),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci"),
    ("What is frozen water called?", "ice"),
    ("Which bird is famous for being unable to fly and living in Antarctica?", "the penguin"),
    ("How many sides does a hexagon have?", "six"),
    ("What is the tallest mountain above sea level?", "Mount Everest"),
    ("Which organ pumps blood around the human body?", "the heart"),
    ("In what year did humans first land on the Moon?", "nineteen sixty-nine"),
    ("What is the main ingredient of guacamole?", "avocado"),
    ("Which city is home to the Colosseum?", "Rome"),
    ("What is the boiling point of water at sea level, in degrees Celsius?", "one hundred"),
    ("Which animal is known as the king of the jungle?", "the lion"),
    ("What is the largest mammal that has ever lived?", "the blue whale"),
    ("How many continents are there?", "seven"),
    ("What color do you get when you mix blue and yellow?", "green"),
    ("Which scientist proposed the theory of general relativity?", "Albert Einstein"),
    ("What is the capital of Japan?", "Tokyo"),
    ("Which desert is the largest hot desert in the world?", "the Sahara"),
    ("What do you call a baby kangaroo?", "a joey"),
    ("How many strings does a standard guitar have?", "six"),
    ("Which country gave the Statue of Liberty to the United States?", "France"),
    ("What is the closest star to Earth?", "the Sun"),
]
