"""MMLU's 57 subjects with the standard subject -> subcategory -> category mapping (Hendrycks et al.,
also used by the AceGPT scripts), and an Arabic subject name for prompts.

The table is the single source of truth: the S3 loader uses it to know which files to read (an object
store is not listed), and the MMLU headline averages over its four categories.
"""

from __future__ import annotations

STEM, HUMANITIES, SOCIAL, OTHER = "STEM", "humanities", "social sciences", "other"
CATEGORIES = (STEM, HUMANITIES, SOCIAL, OTHER)

# subject, subcategory, category, Arabic name
_TABLE = """
abstract_algebra|math|STEM|الجبر التجريدي
anatomy|health|other|علم التشريح
astronomy|physics|STEM|علم الفلك
business_ethics|business|other|أخلاقيات الأعمال
clinical_knowledge|health|other|المعرفة السريرية
college_biology|biology|STEM|علم الأحياء الجامعي
college_chemistry|chemistry|STEM|الكيمياء الجامعية
college_computer_science|computer science|STEM|علوم الحاسوب الجامعية
college_mathematics|math|STEM|الرياضيات الجامعية
college_medicine|health|other|الطب الجامعي
college_physics|physics|STEM|الفيزياء الجامعية
computer_security|computer science|STEM|أمن الحاسوب
conceptual_physics|physics|STEM|الفيزياء المفاهيمية
econometrics|economics|social sciences|الاقتصاد القياسي
electrical_engineering|engineering|STEM|الهندسة الكهربائية
elementary_mathematics|math|STEM|الرياضيات الابتدائية
formal_logic|philosophy|humanities|المنطق الصوري
global_facts|other|other|حقائق عالمية
high_school_biology|biology|STEM|علم الأحياء للمرحلة الثانوية
high_school_chemistry|chemistry|STEM|الكيمياء للمرحلة الثانوية
high_school_computer_science|computer science|STEM|علوم الحاسوب للمرحلة الثانوية
high_school_european_history|history|humanities|تاريخ أوروبا للمرحلة الثانوية
high_school_geography|geography|social sciences|الجغرافيا للمرحلة الثانوية
high_school_government_and_politics|politics|social sciences|الحكومة والسياسة للمرحلة الثانوية
high_school_macroeconomics|economics|social sciences|الاقتصاد الكلي للمرحلة الثانوية
high_school_mathematics|math|STEM|الرياضيات للمرحلة الثانوية
high_school_microeconomics|economics|social sciences|الاقتصاد الجزئي للمرحلة الثانوية
high_school_physics|physics|STEM|الفيزياء للمرحلة الثانوية
high_school_psychology|psychology|social sciences|علم النفس للمرحلة الثانوية
high_school_statistics|math|STEM|الإحصاء للمرحلة الثانوية
high_school_us_history|history|humanities|تاريخ الولايات المتحدة للمرحلة الثانوية
high_school_world_history|history|humanities|تاريخ العالم للمرحلة الثانوية
human_aging|health|other|شيخوخة الإنسان
human_sexuality|culture|social sciences|الجنسانية البشرية
international_law|law|humanities|القانون الدولي
jurisprudence|law|humanities|فقه القانون
logical_fallacies|philosophy|humanities|المغالطات المنطقية
machine_learning|computer science|STEM|تعلم الآلة
management|business|other|الإدارة
marketing|business|other|التسويق
medical_genetics|health|other|علم الوراثة الطبية
miscellaneous|other|other|متفرقات
moral_disputes|philosophy|humanities|النزاعات الأخلاقية
moral_scenarios|philosophy|humanities|السيناريوهات الأخلاقية
nutrition|health|other|التغذية
philosophy|philosophy|humanities|الفلسفة
prehistory|history|humanities|ما قبل التاريخ
professional_accounting|other|other|المحاسبة المهنية
professional_law|law|humanities|القانون المهني
professional_medicine|health|other|الطب المهني
professional_psychology|psychology|social sciences|علم النفس المهني
public_relations|politics|social sciences|العلاقات العامة
security_studies|politics|social sciences|الدراسات الأمنية
sociology|culture|social sciences|علم الاجتماع
us_foreign_policy|politics|social sciences|السياسة الخارجية الأمريكية
virology|health|other|علم الفيروسات
world_religions|philosophy|humanities|أديان العالم
"""

SUBJECTS: dict[str, tuple[str, str, str]] = {
    row.split("|")[0]: tuple(row.split("|")[1:])  # type: ignore[misc]
    for row in _TABLE.strip().splitlines()
}
SUBJECT_CATEGORY: dict[str, str] = {s: v[1] for s, v in SUBJECTS.items()}
SUBJECT_NAME_AR: dict[str, str] = {s: v[2] for s, v in SUBJECTS.items()}

# EXAMS (Arabic part) subjects as its ids spell them.
EXAMS_NAME_AR = {
    "Islamic Studies": "الدراسات الإسلامية",
    "Science": "العلوم",
    "Social": "الاجتماعيات",
    "Biology": "علم الأحياء",
    "Physics": "الفيزياء",
}
