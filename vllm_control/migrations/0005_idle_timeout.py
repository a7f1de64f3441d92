from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('vllm_control', '0004_model_servers'),
    ]

    operations = [
        migrations.AddField(
            model_name='vlmsettings',
            name='idle_timeout_min',
            field=models.PositiveIntegerField(blank=True, help_text='Stop the local server after this many minutes without requests (frees the GPU); the next page that needs it starts it again. 0: never. Blank: VLLM_IDLE_TIMEOUT_MIN, else never.', null=True, verbose_name='Idle timeout (min)'),
        ),
    ]
