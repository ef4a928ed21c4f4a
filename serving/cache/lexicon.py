"""Word lists the prompt reader (`text.py`) uses: contractions, abbreviations, numbers, units,
negations, question words, framing words and a small synonym table.

Plain data, so a reader sees in one place what the verifier treats as the same word. WordNet
(`wordnet.py`) adds general synonyms on top of `SYNONYMS`.
"""

from __future__ import annotations

# Contractions, with and without the apostrophe ("whats", "dont"): expanded before anything else.
CONTRACTIONS = {
    "what's": "what is", "whats": "what is", "who's": "who is", "whos": "who is", "where's": "where is",
    "wheres": "where is", "when's": "when is", "why's": "why is", "how's": "how is", "hows": "how is",
    "that's": "that is", "thats": "that is", "there's": "there is", "it's": "it is", "he's": "he is",
    "she's": "she is", "here's": "here is", "let's": "let us", "lets": "let us",
    "can't": "can not", "cant": "can not", "cannot": "can not", "won't": "will not", "wont": "will not",
    "shan't": "shall not", "ain't": "is not", "dont": "do not", "doesnt": "does not", "didnt": "did not",
    "isnt": "is not", "arent": "are not", "wasnt": "was not", "werent": "were not", "hasnt": "has not",
    "havent": "have not", "hadnt": "had not", "wouldnt": "would not", "shouldnt": "should not",
    "couldnt": "could not", "mustnt": "must not", "im": "i am", "ive": "i have", "youre": "you are",
    "theyre": "they are", "youve": "you have", "u": "you", "ur": "your", "pls": "please", "plz": "please",
    "thx": "thanks",
}
# Suffixes of other contractions: "I'd" -> "I would", "we've" -> "we have", "doesn't" -> "does not".
CONTRACTION_SUFFIXES = (("n't", " not"), ("'d", " would"), ("'ve", " have"), ("'ll", " will"),
                        ("'re", " are"), ("'m", " am"))

# Phrases and abbreviations with one canonical token. Upper-case keys match only as typed in
# capitals ("US", not the pronoun "us"); the others match in any case.
PHRASES = {
    "US": "usa", "U.S.": "usa", "USA": "usa", "U.S.A.": "usa", "united states": "usa",
    "united states of america": "usa", "UK": "uk", "U.K.": "uk", "united kingdom": "uk",
    "UN": "un", "united nations": "un", "EU": "eu", "european union": "eu",
    "UAE": "uae", "united arab emirates": "uae", "USSR": "ussr", "soviet union": "ussr",
    "DRC": "drc", "democratic republic of the congo": "drc", "NYC": "nyc", "new york city": "nyc",
    "LA": "los_angeles", "los angeles": "los_angeles", "LAX": "lax", "los angeles airport": "lax",
    "los angeles international airport": "lax",
    "WWI": "ww1", "WW1": "ww1", "world war i": "ww1", "world war 1": "ww1", "world war one": "ww1",
    "first world war": "ww1", "great war": "ww1", "WWII": "ww2", "WW2": "ww2", "world war ii": "ww2",
    "world war 2": "ww2", "world war two": "ww2", "second world war": "ww2",
    "NBA": "nba", "national basketball association": "nba", "NFL": "nfl",
    "national football league": "nfl", "MLB": "mlb", "major league baseball": "mlb",
    "NHL": "nhl", "national hockey league": "nhl",
    "NASA": "nasa", "national aeronautics and space administration": "nasa",
    "DNA": "dna", "deoxyribonucleic acid": "dna", "GPS": "gps", "global positioning system": "gps",
    "GDP": "gdp", "gross domestic product": "gdp", "IRA": "ira", "individual retirement account": "ira",
    "HSA": "hsa", "health savings account": "hsa", "ETF": "etf", "exchange traded fund": "etf",
    "ADHD": "adhd", "attention deficit hyperactivity disorder": "adhd", "NSAID": "nsaid",
    "NSAIDs": "nsaid", "nonsteroidal anti inflammatory drug": "nsaid",
    "nonsteroidal anti inflammatory drugs": "nsaid", "ASAP": "asap", "as soon as possible": "asap",
    "covid 19": "covid", "covid": "covid", "JFK": "jfk", "john f kennedy": "jfk",
    "john f. kennedy": "jfk", "s & p 500": "sp500", "standard and poor 500": "sp500",
    "standard & poor 500": "sp500", "JSON": "json", "javascript object notation": "json",
    "HTML": "html", "hypertext markup language": "html", "OS": "os", "operating system": "os",
    "PC": "pc", "personal computer": "pc", "AI": "ai", "artificial intelligence": "ai",
    "ML": "ml_learning", "machine learning": "ml_learning", "CPU": "cpu", "central processing unit": "cpu",
    "RAM": "memory", "BP": "blood_pressure", "blood pressure": "blood_pressure",
    "H2O": "water", "CO2": "carbon_dioxide", "carbon dioxide": "carbon_dioxide",
    "mt": "mount", "mt.": "mount", "st.": "saint", "dr.": "doctor", "py": "python",
    "in what year": "when", "what year": "when", "which year": "when", "what time": "when",
    "how come": "why", "how many": "count", "number of": "count", "for what reason": "why",
    "get rid of": "remove", "instead of": "substitute", "find out": "check", "look up": "check", "set up": "setup",
    "log in": "login", "sign in": "login", "a lot of": "many", "lots of": "many",
}

# Words for numbers ("one" only before a word that is not a function word: "one day", not "which one").
NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen".split())}
TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80,
        "ninety": 90}
SCALES = {"hundred": 100, "thousand": 1000, "million": 10**6, "billion": 10**9}
ORDINALS = {"first": "1st", "second": "2nd", "third": "3rd", "fourth": "4th", "fifth": "5th",
            "sixth": "6th", "seventh": "7th", "eighth": "8th", "ninth": "9th", "tenth": "10th"}
DECADES = {"twenties": "1920s", "thirties": "1930s", "forties": "1940s", "fifties": "1950s",
           "sixties": "1960s", "seventies": "1970s", "eighties": "1980s", "nineties": "1990s"}
MULTIPLES = {"twice": "2x", "double": "2x", "triple": "3x", "dozen": "12"}

# Units: written forms -> one symbol. Data-size units keep their case ("Mb" is not "MB").
UNIT_WORDS = {
    "kilometer": "km", "kilometre": "km", "km": "km", "mile": "mi", "mi": "mi", "meter": "m", "metre": "m",
    "m": "m", "foot": "ft", "feet": "ft", "ft": "ft", "inch": "in", "inches": "in", "yard": "yd", "yd": "yd",
    "centimeter": "cm", "centimetre": "cm", "cm": "cm", "millimeter": "mm", "millimetre": "mm", "mm": "mm",
    "nanometer": "nm", "nm": "nm", "micrometer": "um", "micron": "um", "um": "um",
    "gram": "g", "g": "g", "kilogram": "kg", "kilo": "kg", "kg": "kg", "milligram": "mg", "mg": "mg",
    "ounce": "oz", "oz": "oz", "pound": "lb", "lb": "lb", "lbs": "lb", "ton": "t", "tonne": "t",
    "liter": "l", "litre": "l", "l": "l", "milliliter": "ml", "millilitre": "ml", "ml": "ml",
    "gallon": "gal", "gal": "gal", "cup": "cup", "tablespoon": "tbsp", "tbsp": "tbsp", "teaspoon": "tsp",
    "tsp": "tsp", "celsius": "°C", "centigrade": "°C", "fahrenheit": "°F", "kelvin": "K",
    "calorie": "cal", "cal": "cal", "kilocalorie": "kcal", "kcal": "kcal", "joule": "J", "j": "J",
    "hectare": "ha", "ha": "ha", "acre": "acre", "horsepower": "hp", "hp": "hp", "watt": "W", "w": "W",
    "kw": "kW", "kwh": "kWh", "mw": "MW", "volt": "V", "v": "V", "hz": "Hz", "khz": "kHz", "mhz": "MHz",
    "ghz": "GHz", "mph": "mph", "kph": "km/h", "kmh": "km/h", "km/h": "km/h", "m/s": "m/s", "km/s": "km/s",
    "mg/dl": "mg/dL", "mmol/l": "mmol/L", "psi": "psi", "rpm": "rpm", "fps": "fps", "dpi": "dpi",
    "px": "px", "db": "dB",
    "millisecond": "ms", "ms": "ms", "nanosecond": "ns", "ns": "ns", "microsecond": "us",
    "second": "s", "sec": "s", "s": "s", "minute": "min", "min": "min", "hour": "h", "hr": "h", "h": "h",
    "day": "day", "week": "week", "month": "month", "year": "year", "yr": "year", "decade": "decade",
    "percent": "%", "pct": "%", "%": "%", "dollar": "USD", "usd": "USD", "$": "USD", "buck": "USD",
    "euro": "EUR", "eur": "EUR", "€": "EUR", "£": "GBP", "gbp": "GBP", "yen": "JPY", "jpy": "JPY",
    "k": "k", "degree": "deg", "c": "°C", "f": "°F", "d": "D", "dimensional": "D",
}
DATA_UNITS = frozenset(
    "b kb mb gb tb pb kib mib gib tib bit byte kbit mbit gbit bps kbps mbps gbps tbps mb/s gb/s kb/s".split())
# Abbreviations that are English words or letters too: units only right after a number ("5 m").
UNITS_AFTER_NUMBER_ONLY = frozenset("m in l g s h j w v k b c f t ha min sec day week month year "
                                    "decade yd mi um ms cup d".split())

NEGATIONS = frozenset("not no never none nothing nobody nowhere neither nor without except excluding "
                      "unless".split())

# Question words that change what is asked; "what" and "which" are interchangeable, "how" is framing.
QUESTION_WORDS = frozenset("why when where who whom whose".split())

# Function words and question framing: they never decide what is asked.
STOPWORDS = frozenset(
    "a an the is are was were be been being am do does did doing i me my mine you your yours we us our "
    "he she it its they them their this that these those there here can could would should will shall "
    "may might must please tell show give explain describe help know want need like let how what "
    "way ways method methods best good proper correct right simple simply easy easiest quick quickly "
    "some any in on of for with at by as and or but about using use via so if then than to from into "
    "onto over under up down out off again also just only really actually exactly possible "
    "something someone anything thing things get getting got make "
    "one ones kind type which whether have has had having effectively properly correctly "
    "hi hello hey thanks thank thankyou question wondering wonder wondered curious always ever "
    "somebody anyone anybody love learn tips tip advice recommendation recommendations recommend "
    "suggest suggestion suggestions idea ideas walk through understand teach summarize "
    "summarise mind okay ok sure kindly go going few bit say basically generally typically usually "
    "between much word vs versus".split())

# Imperatives that are also nouns: framing only at the start of a request ("List the symptoms",
# "can you name"), content elsewhere ("a list of dictionaries", "find a file by name").
LEADING_FRAMING = frozenset("list name".split())
FRAMING_BEFORE = frozenset("please you me us".split())

# Markers across which the order of two words carries meaning ("string to int" / "int to string").
DIRECTIONAL = frozenset(
    "to into from than vs versus before after over under above below per onto toward towards against "
    "by until till through instead rather for".split())

# Canonical forms for words that paraphrases swap for each other (WordNet adds many more).
SYNONYMS = {
    "int": "integer", "str": "string", "dict": "dictionary", "dicts": "dictionary",
    "turn": "convert", "change": "convert", "transform": "convert", "cast": "convert",
    "delete": "remove", "erase": "remove", "drop": "remove", "eliminate": "remove", "strip": "remove",
    "uninstall": "remove",
    "fastest": "fast", "quickest": "fast", "faster": "fast", "quicker": "fast", "speedy": "fast",
    "largest": "big", "biggest": "big", "large": "big", "greatest": "big", "huge": "big",
    "smallest": "small", "tiny": "small", "little": "small", "tallest": "high", "tall": "high",
    "highest": "high",
    "begin": "start", "commence": "start", "finish": "end", "purchase": "buy", "automobile": "car",
    "utilize": "use", "obtain": "get", "retrieve": "get", "fetch": "get", "acquire": "get",
    "display": "print", "output": "print", "create": "make", "build": "make", "generate": "make",
    "combine": "merge", "join": "merge", "concatenate": "merge", "divide": "split",
    "examine": "check", "verify": "check", "test": "check", "determine": "check",
    "compute": "calculate", "total": "sum", "append": "add", "arrange": "sort",
    "meaning": "mean", "means": "mean", "definition": "mean", "define": "mean", "doctor": "physician",
    "film": "movie", "kid": "child", "kids": "child", "children": "child", "happen": "occur",
    "capitol": "capital", "mistake": "error", "bug": "error", "cost": "price", "costs": "price",
    "location": "place", "situated": "located", "primary": "main", "principal": "main",
    "revert": "undo", "quit": "exit", "lower": "reduce", "decrease": "reduce", "modify": "edit",
    "alter": "edit", "launch": "start", "differ": "difference", "different": "difference",
    "benefit": "advantage", "pros": "advantage", "temp": "temperature", "info": "information",
    "app": "application", "config": "configuration", "dir": "directory", "folder": "directory",
    "repo": "repository", "args": "argument", "env": "environment", "pic": "picture", "photo": "picture",
    "fix": "solve", "resolve": "solve", "another": "other", "antonym": "opposite", "reason": "cause",
    "ram": "memory", "earth": "world",
}
