"""Sentences written for the language-identification choice (bench/language_id.py) and its tests.

Arabic, Persian and Urdu share one script, so the Arabic-ratio filter cannot tell them apart; English
is the replay language of AceGPT's mixture. Each list holds everyday sentences on varied topics; the
Persian and Urdu ones avoid nothing Arabic on purpose (loanwords are common in both).
`documents()` joins them into paragraph-sized documents, the size a pre-training record usually has.
"""

from __future__ import annotations

import random

SENTENCES: dict[str, list[str]] = {
    "ar": [
        "في صباح كل يوم يخرج سكان المدينة القديمة إلى الأسواق الضيقة بحثا عن الخبز الطازج.",
        "تعد المكتبات العامة من أهم المؤسسات الثقافية في أي مجتمع.",
        "يعتمد المزارعون في الواحات على مياه الآبار لري أشجار النخيل.",
        "أعلنت وزارة الصحة عن حملة جديدة للتطعيم تبدأ الأسبوع المقبل في جميع المحافظات.",
        "ذهبت مع أصدقائي إلى البحر وقضينا يوما جميلا على الشاطئ.",
        "قال الطبيب إن علي أن أشرب مزيدا من الماء وأن أقلل من القهوة.",
        "ارتفعت أسعار تذاكر القطار في الشهر الماضي إلى الضعف، فغضب المسافرون.",
        "وُلد المتنبي في الكوفة، ويعد من أعظم شعراء العربية.",
        "من فضلك أطفئ الأنوار قبل أن تغادر البيت.",
        "يلعب الأطفال كرة القدم في ساحة المدرسة والمعلم يراقبهم.",
        "يعمل في هذه الشركة أكثر من خمسمئة موظف معظمهم من المهندسين.",
        "تسببت أمطار الليلة الماضية في امتلاء شوارع المدينة بالمياه.",
        "هل تعرف أين تقع أقرب صيدلية من هنا؟",
        "كتب الطالب بحثه عن تاريخ الأندلس وقدمه إلى أستاذه يوم الخميس.",
    ],
    "fa": [
        "امروز هوا خیلی خوب است و ما تصمیم گرفتیم به پارک برویم.",
        "کتابخانه‌ی شهر ما هر روز از ساعت هشت صبح تا هشت شب باز است.",
        "او سال‌ها در تهران زندگی کرد و سپس برای ادامه‌ی تحصیل به اصفهان رفت.",
        "برای پختن این غذا به برنج، زعفران، مرغ و کمی کره نیاز دارید.",
        "دانشجویان باید تا پایان هفته مقاله‌های خود را به استاد تحویل دهند.",
        "قیمت بلیت قطار در ماه گذشته دو برابر شده است و مردم ناراضی هستند.",
        "شاعران بزرگی مانند حافظ و سعدی در شیراز به دنیا آمده‌اند.",
        "لطفاً قبل از خروج از خانه چراغ‌ها را خاموش کنید.",
        "بچه‌ها در حیاط مدرسه فوتبال بازی می‌کنند و معلم آنها را تماشا می‌کند.",
        "پزشک به من گفت که باید بیشتر آب بنوشم و کمتر قهوه بخورم.",
        "در این شرکت بیش از پانصد نفر کار می‌کنند و بیشتر آنها مهندس هستند.",
        "باران دیشب باعث شد که خیابان‌های شهر پر از آب شود.",
        "آیا می‌دانید نزدیک‌ترین داروخانه کجاست؟",
        "وزارت بهداشت اعلام کرد که برنامه‌ی واکسیناسیون از هفته‌ی آینده آغاز می‌شود.",
    ],
    "ur": [
        "آج موسم بہت اچھا ہے اور ہم پارک جانے کا سوچ رہے ہیں۔",
        "میرا بھائی لاہور میں ایک بینک میں کام کرتا ہے۔",
        "بچے اسکول کے میدان میں کرکٹ کھیل رہے ہیں اور استاد انہیں دیکھ رہے ہیں۔",
        "اس کتاب میں اردو ادب کی تاریخ کے بارے میں بہت سی معلومات ہیں۔",
        "ڈاکٹر نے کہا کہ مجھے زیادہ پانی پینا چاہیے اور چائے کم پینی چاہیے۔",
        "کل رات بارش کی وجہ سے سڑکوں پر پانی جمع ہو گیا تھا۔",
        "ہماری دادی ہمیں ہر رات پرانی کہانیاں سناتی تھیں۔",
        "ٹرین کا ٹکٹ پچھلے مہینے سے دو گنا مہنگا ہو گیا ہے۔",
        "علامہ اقبال پاکستان کے قومی شاعر سمجھے جاتے ہیں۔",
        "براہ کرم گھر سے نکلنے سے پہلے بتیاں بند کر دیں۔",
        "اس کمپنی میں پانچ سو سے زیادہ لوگ کام کرتے ہیں جن میں زیادہ تر انجینئر ہیں۔",
        "میں نے بازار سے سبزیاں اور پھل خریدے۔",
        "کیا آپ جانتے ہیں کہ سب سے قریب دوا خانہ کہاں ہے؟",
        "وزارت صحت نے اعلان کیا ہے کہ ویکسین کی مہم اگلے ہفتے سے شروع ہوگی۔",
    ],
    "en": [
        "Every morning the people of the old town walk to the narrow markets to buy fresh bread.",
        "Public libraries are among the most important cultural institutions of any community.",
        "Farmers in the oases depend on well water to irrigate their date palms.",
        "The ministry of health announced a new vaccination campaign starting next week.",
        "I went to the beach with my friends and we spent a lovely day by the sea.",
        "The doctor told me to drink more water and less coffee.",
        "Train ticket prices doubled last month, and travellers are angry.",
        "Please switch off the lights before you leave the house.",
        "The children are playing football in the schoolyard while the teacher watches them.",
        "More than five hundred people work at this company, most of them engineers.",
        "Last night's rain flooded the streets of the city.",
        "Do you know where the nearest pharmacy is?",
        "The student wrote his paper on the history of al-Andalus and handed it in on Thursday.",
        "Researchers released a small open model trained on a mixture of web text and books.",
    ],
}

LANGUAGES = tuple(SENTENCES)

# Harder cases: a few words only, and Arabic dialects (which are Arabic for a pre-training filter).
SHORT: dict[str, list[str]] = {
    "ar": ["كيف حالك اليوم", "شكرا جزيلا لك", "أين المحطة", "الطقس جميل", "مرحبا بكم في موقعنا",
           "سعر الذهب اليوم", "نتائج المباراة", "وصفة الكبسة باللحم"],
    "fa": ["حال شما چطور است", "خیلی ممنونم", "ایستگاه کجاست", "هوا خوب است", "به سایت ما خوش آمدید",
           "قیمت طلا امروز", "نتیجه‌ی بازی", "دستور پخت قورمه سبزی"],
    "ur": ["آپ کیسے ہیں", "بہت شکریہ", "اسٹیشن کہاں ہے", "موسم اچھا ہے", "ہماری ویب سائٹ پر خوش آمدید",
           "آج سونے کی قیمت", "میچ کا نتیجہ", "بریانی بنانے کا طریقہ"],
    "en": ["how are you today", "thank you very much", "where is the station", "nice weather",
           "welcome to our website", "gold price today", "match results", "lamb kabsa recipe"],
}
DIALECT_ARABIC = [
    "ازيك يا صاحبي عامل ايه النهارده، بقالي كتير ما شفتكش.",  # Egyptian
    "شلونك اليوم؟ وين رايح بعد الدوام؟",  # Gulf
    "شو بدك تعمل بكرا؟ بدنا نروح ع البحر إذا الطقس منيح.",  # Levantine
    "واش راك لاباس؟ غادي نمشيو للسوق من بعد.",  # Maghrebi
    "والله الأكل كان يجنن بس السعر غالي شوية.",
    "ليش ما رديت على التلفون امبارح؟ كنت بدي احكي معك.",
    "احنا رايحين المول نشتري هدوم للعيد، تيجي معانا؟",
    "الجو حر مرة اليوم، خلنا نقعد في البيت.",
]
MIXED_ARABIC = [  # Arabic documents with Latin-script terms, as technical and news text has
    "استخدمنا مكتبة PyTorch لتدريب النموذج على بطاقات GPU من نوع H100 لمدة أسبوعين.",
    "أعلنت شركة Apple عن هاتف iPhone الجديد في مؤتمرها السنوي بمدينة Cupertino.",
    "يمكنك تحميل التطبيق من متجر Google Play أو App Store مجانا.",
    "حقق فريق Real Madrid فوزا كبيرا على Barcelona في مباراة الأمس بنتيجة ثلاثة أهداف مقابل هدف.",
]


def documents(language: str, count: int, sentences: int = 4, seed: int = 0) -> list[str]:
    """`count` paragraph documents of `sentences` sentences each, drawn from one language's list."""
    rng = random.Random(f"{language}-{seed}")
    pool = SENTENCES[language]
    return [" ".join(rng.sample(pool, sentences)) for _ in range(count)]
